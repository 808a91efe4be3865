"""The format warm-up: a few supervised steps that teach the default model the answer format, on *other* questions.

Untrained, the 135M default model never closes an ``<answer>`` block within the laptop job's 48 tokens, so
every reward is 0: no rollout is ever a successful sibling, and GRPO's advantages are all zero. The warm-up
fine-tunes it on well-formed answers (``<reasoning>`` stating the fact the question asks about, then naming the
chosen option's letter and text; then ``<answer>`` with the letter) to synthetic questions drawn with another
generator seed, none of which is a question of the task's train split or may fall in its test split. Every method
of the laptop job and its benchmark starts from the warmed model (:data:`demopsd.runtime.models.WARMED_MODEL`), so
none is favoured.

On uninferable questions the trained letters are random draws, so nothing about their answers is learnt;
on inferable ones the model sees worked examples of the same templates, which is what makes it sometimes right.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.data.synthetic import fact_sentence, generate_synthetic, held_out_by
from demopsd.data.types import MCQExample, option_texts, student_conversation
from demopsd.runtime.models import (
    DEFAULT_MODEL,
    WARMED_MODEL,
    cached_model_path,
    load_model_and_tokenizer,
    save_atomically,
)

log = logging.getLogger(__name__)

WARMUP_KINDS = ("mixed", "inferable")
RECIPE = 4
"""The version of what the warm-up teaches (:func:`well_formed_answer`, on the questions of
:mod:`demopsd.data.synthetic`), recorded in ``warmup.json``; a change of either raises it, so that cached builds of
an old recipe are built again. 1: the chosen option's text as the reasoning, on the first ten inferable templates;
2 (withdrawn): a worked step as the reasoning; 3: the chosen option's line as the reasoning, on the six templates of
everyday knowledge; 4: the fact recalled before the chosen option's line."""


@dataclass(frozen=True)
class WarmupConfig:
    """``steps`` AdamW steps of ``batch_size`` questions at learning rate ``lr``; the questions are the synthetic
    questions of ``kind`` ("mixed", or "inferable" only) of ``generator_seed``, leaving out those of the task
    generated with each of ``task_seeds`` (the leakage runs' seeds: each run generates its questions with its seed,
    ``data.generator_seed: ${seed}``), so that no run trains or is evaluated on a question the warm-up taught."""

    steps: int = 30
    batch_size: int = 8
    lr: float = 3e-5
    kind: str = "mixed"
    generator_seed: int = 1000
    task_seeds: tuple[int, ...] = (0, 1, 2)
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"warmup {key}={getattr(self, key)} is invalid: an integer >= 1 is accepted")
        if not self.lr > 0:
            raise ValueError(f"warmup lr={self.lr} is invalid: a positive learning rate is accepted")
        if self.kind not in WARMUP_KINDS:
            raise ValueError(f"warmup kind={self.kind!r} is invalid: accepted: {', '.join(WARMUP_KINDS)}")
        object.__setattr__(self, "task_seeds", tuple(self.task_seeds))  # a list when read back from warmup.json
        if self.generator_seed in self.task_seeds:
            raise ValueError(f"warmup generator_seed={self.generator_seed} is invalid: it must differ from "
                             f"task_seeds={self.task_seeds}, so that the warm-up questions are other questions")


def warmup_questions(config: WarmupConfig) -> list[MCQExample]:
    """``steps * batch_size`` questions of ``config.kind`` and ``config.generator_seed`` that are neither in the
    train split of any of the task's seeds nor in the part of the question space its test split is drawn from."""
    needed = config.steps * config.batch_size
    task_train = {e.prompt for seed in config.task_seeds for e in generate_synthetic("mixed", "train", seed=seed)}
    pool = generate_synthetic(config.kind, "train", seed=config.generator_seed, size=3 * needed)
    kept = [e for e in pool
            if e.prompt not in task_train and not any(held_out_by(seed, e) for seed in config.task_seeds)]
    if len(kept) < needed:  # pragma: no cover - a fifth of the pool is held out, on average
        raise RuntimeError(f"only {len(kept)} warm-up questions left of {len(pool)}; {needed} needed")
    return kept[:needed]


def well_formed_answer(example: MCQExample) -> str:
    """The answer the warm-up teaches: as the reasoning, the fact the question asks about, then the line of the option
    that states it ("The capital of France is Paris. The answer is C: Paris."; uninferable questions have no fact
    and keep only the option's line); then its letter, which the answer block only has to copy."""
    option = option_texts(example.prompt)[example.answer]
    recalled = f"{fact} " if (fact := fact_sentence(example)) else ""
    return (f"<reasoning>\n{recalled}The answer is {example.answer}: {option}.\n</reasoning>\n"
            f"<answer>\n{example.answer}\n</answer>")


def supervised_batch(
    tokenizer: PreTrainedTokenizerBase, examples: list[MCQExample]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` ``[B, T]``: each chat prompt followed by its
    :func:`well_formed_answer` and EOS, right-padded; labels are -100 outside the answers."""
    rows = []
    for example in examples:
        prompt = tokenizer.apply_chat_template(student_conversation(example), tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        answer_ids = tokenizer(well_formed_answer(example), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt_ids, answer_ids))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (prompt_ids, answer_ids) in enumerate(rows):
        length = len(prompt_ids) + len(answer_ids)
        ids[i, :length] = torch.tensor(prompt_ids + answer_ids)
        mask[i, :length] = 1
        labels[i, len(prompt_ids) : length] = torch.tensor(answer_ids)
    return ids, mask, labels


def format_warmup(
    policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: WarmupConfig, *, progress: bool = True
) -> list[float]:
    """Fine-tune ``policy`` in place as ``config`` says; returns the loss of every step."""
    questions = warmup_questions(config)
    random.Random(config.seed).shuffle(questions)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    policy.train()
    losses = []
    bar = tqdm(range(config.steps), desc="format warm-up", unit="step", disable=not progress)
    for step in bar:
        batch = questions[step * config.batch_size : (step + 1) * config.batch_size]
        ids, mask, labels = (t.to(policy.device) for t in supervised_batch(tokenizer, batch))
        loss = policy(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def build_warmed_model(cache_dir: str | Path | None = None, config: WarmupConfig | None = None) -> Path:
    """The warmed default model at :func:`cached_model_path` of :data:`WARMED_MODEL`, trained on first use
    (about 10 minutes on a 2-core CPU). A build of another recipe or other settings is replaced."""
    target = cached_model_path(WARMED_MODEL, cache_dir)
    config = config or WarmupConfig()
    if target.is_dir():
        stale = stale_build(target, config)
        if not stale:
            return target
        log.warning("%s in %s was built %s; building it again", WARMED_MODEL, target, stale)
        shutil.rmtree(target)
    log.info("Building %s once: %d supervised steps on the answer format (%s)", WARMED_MODEL, config.steps, target)
    return warm_up(target, config, cache_dir)


def warm_up(target: Path, config: WarmupConfig, cache_dir: str | Path | None = None) -> Path:
    """The default model after the warm-up of ``config``, saved to ``target`` with ``warmup.json`` beside the
    weights (the recipe, the settings and the loss of every step)."""
    policy, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=cache_dir)
    losses = format_warmup(policy, tokenizer, config)
    save_atomically(policy.eval(), tokenizer, target, extra={"warmup.json": json.dumps(
        {"base_model": DEFAULT_MODEL, "recipe": RECIPE, "config": asdict(config), "losses": losses}, indent=2) + "\n"})
    return target


def stale_build(target: Path, config: WarmupConfig) -> str:
    """Why the build in ``target`` is not :data:`RECIPE` with ``config`` ("" when it is, or when ``target`` has
    no ``warmup.json`` to say: a model put there by hand is used as it is)."""
    record = target / "warmup.json"
    if not record.is_file():
        return ""
    built = json.loads(record.read_text(encoding="utf-8"))
    if built.get("recipe", 1) != RECIPE:
        return f"by recipe {built.get('recipe', 1)}, the current one is {RECIPE}"
    try:  # settings added since the build take their defaults
        same = WarmupConfig(**built.get("config", {})) == config
    except (TypeError, ValueError):
        same = False
    if not same:
        return f"with {built.get('config')}, the current settings are {asdict(config)}"
    return ""
