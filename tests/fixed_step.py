"""One real training step of :class:`SelfDistillationModule` on a fixed batch, and plain forwards to check it.

The module is assembled from the Hydra config by :func:`demopsd.training.run.build_module` around a tiny random
Llama with the default model's tokenizer, and stepped by a real ``lightning.Trainer`` built from the config's
``trainer`` section (CPU, one step, nothing written). Sampling and scoring are replaced by fixed rollouts and
fixed rewards (:class:`FixedRollouts`, :func:`rewards_by_text`); :class:`LossCalls` records what the step hands
to the distillation loss. Used by ``test_learning_direction.py`` and ``test_teacher_alignment.py``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, LlamaForCausalLM

import demopsd.rollout.scored
import demopsd.training.steps
from demopsd.config.check import validate_config
from demopsd.data.rewards import MCQScore
from demopsd.data.types import MCQExample
from demopsd.objectives import chunked_distillation_loss
from demopsd.rollout.batch import RolloutBatch, repeat_prompts
from demopsd.runtime.models import GGUF_FILE, default_gguf_dir, prepare_tokenizer
from demopsd.training.module import SelfDistillationModule
from demopsd.training.run import build_module
from tests.helpers import CONFIG_DIR, tiny_policy


@functools.cache
def default_tokenizer():
    """The default model's tokenizer (and chat template), read from its GGUF file without the weights."""
    return prepare_tokenizer(AutoTokenizer.from_pretrained(default_gguf_dir(), gguf_file=GGUF_FILE))


def train_config(method: str, *overrides: str) -> DictConfig:
    """The composed training config of ``method`` (SciKnowEval data settings, no embedded experiment)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=["~experiment", "data=sciknoweval/biology", f"method={method}", *overrides],
        )


SYSTEM = "Answer with the letter of the right option."  # shorter than the task's: the same code path, faster


def example(question: str, answer: str, idx: int = 0) -> MCQExample:
    """A four-option question."""
    prompt = f"{question}\nA: one\nB: two\nC: three\nD: four\nPlease reason step by step."
    return MCQExample(prompt=prompt, answer=answer, system=SYSTEM, idx=idx, letters="ABCD")


@dataclass
class FixedRollouts:
    """A rollout engine that serves the same responses every call, right-padded, each ending with EOS.

    ``texts`` are the decoded responses (what the module scores and shows as demonstrations); ``served``
    collects every batch handed out.
    """

    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    served: list[RolloutBatch] = field(default_factory=list)

    @classmethod
    def of(cls, tokenizer, responses: list[str]) -> FixedRollouts:
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in responses]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return cls(ids, mask, tokenizer.batch_decode(ids.masked_fill(mask == 0, tokenizer.pad_token_id),
                                                     skip_special_tokens=True))

    uses_policy_weights = False

    def policy_updated(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def generate(self, prompts, sampling, greedy: bool = False, entropy: bool = False) -> RolloutBatch:
        assert len(self.texts) == prompts.ids.shape[0] * sampling.n, "fixed responses do not match the batch"
        batch = RolloutBatch(
            prompt=repeat_prompts(prompts, sampling.n), response_ids=self.response_ids.clone(),
            response_mask=self.response_mask.clone(), texts=list(self.texts), seconds=0.0, group_size=sampling.n,
        )
        self.served.append(batch)
        return batch


def rewards_by_text(rewards: dict[str, float]):
    """A ``score_mcq`` stand-in: the reward of each completion is looked up by its text."""

    def score(completion: str, answer: str, *args, **kwargs) -> MCQScore:
        reward = rewards[completion]
        return MCQScore(reward=reward, correct=reward > 0, well_formed=True, predicted=answer if reward else None)

    return score


class LossCalls:
    """Wraps ``chunked_distillation`` in the steps' namespace (one call per micro-batch); keeps a detached copy of every call's
    arguments and of the loss it returned (``"loss"``)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        self._real = demopsd.training.steps.chunked_distillation
        monkeypatch.setattr(demopsd.training.steps, "chunked_distillation", self)

    def __call__(self, student_hidden, student_head, teacher_hidden, teacher_head, tokens, token_weights, config,
                 **kwargs):
        self.calls.append({
            "student_hidden": student_hidden.detach().clone(), "student_head": student_head.detach().clone(),
            "teacher_hidden": teacher_hidden.detach().clone(), "teacher_head": teacher_head.detach().clone(),
            "tokens": tokens.clone(), "token_weights": token_weights.detach().clone(), "config": config,
            "kwargs": kwargs,
        })
        loss, stats = self._real(student_hidden, student_head, teacher_hidden, teacher_head, tokens, token_weights,
                                 config, **kwargs)
        self.calls[-1]["loss"] = loss.detach().clone()
        return loss, stats


def replay(call: dict, **replaced):
    """The real ``chunked_distillation_loss`` on a :class:`LossCalls` record, some arguments replaced."""
    args = {k: v for k, v in call.items() if k not in ("kwargs", "loss")} | replaced
    return chunked_distillation_loss(**args, **call["kwargs"])


@dataclass
class Step:
    """A module of one method with fixed rollouts and rewards, ready for :meth:`fit`."""

    module: SelfDistillationModule
    cfg: DictConfig
    rollouts: FixedRollouts
    initial: LlamaForCausalLM
    """A frozen copy of the policy before any step."""

    def fit(self, batch: list[MCQExample]) -> L.Trainer:
        """One optimizer step on ``batch`` with the config's trainer, on the CPU, writing nothing."""
        trainer = hydra.utils.instantiate(
            self.cfg.trainer, accelerator="cpu", devices=1, max_steps=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False,
        )
        trainer.fit(self.module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=list))
        assert trainer.global_step == 1
        return trainer


def setup_step(monkeypatch, method: str, responses: list[str], rewards: list[float], *overrides: str,
               seed: int = 0) -> Step:
    """The module of ``method`` (config ``overrides``) whose rollouts are ``responses`` with ``rewards``."""
    tokenizer = default_tokenizer()
    cfg = train_config(method, *overrides)
    policy = tiny_policy(tokenizer, seed)
    initial = copy.deepcopy(policy).eval().requires_grad_(False)
    rollouts = FixedRollouts.of(tokenizer, responses)
    assert len(set(rollouts.texts)) == len(rollouts.texts), "responses must decode to distinct texts"
    monkeypatch.setattr(demopsd.rollout.scored, "score_mcq", rewards_by_text(dict(zip(rollouts.texts, rewards))))
    module = build_module(validate_config(cfg), policy, tokenizer)
    module.make_rollout_engine = lambda local_rank=0: rollouts
    return Step(module, cfg, rollouts, initial)


def response_outputs(model, prompt_ids: torch.Tensor, response_ids: torch.Tensor):
    """Plain forward of one unpadded sequence ``prompt + response``: the final hidden states ``[R, H]`` and the
    logits ``[R, V]`` at the positions that predict each response token."""
    ids = torch.cat([prompt_ids, response_ids])[None]
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    hidden = out.hidden_states[-1][0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(response_ids)]
    return hidden, model.get_output_embeddings()(hidden)


def unpadded(batch: RolloutBatch, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row`` of a served batch: its prompt tokens and its response tokens, without padding."""
    prompt = batch.prompt.ids[row][batch.prompt.mask[row].bool()]
    return prompt, batch.response_ids[row][batch.response_mask[row].bool()]


def one_step_with_fixed_rollouts(monkeypatch, cfg: DictConfig, policy, responses: list[str], rewards: list[float],
                                 batch: list[MCQExample]) -> tuple[SelfDistillationModule, FixedRollouts, dict]:
    """One real training step of the module ``cfg`` builds around ``policy`` on ``batch``, its rollouts
    ``responses`` scored ``rewards``: the trained module, the rollout engine (``served`` holds the batch) and the
    metrics the step logged."""
    tokenizer = default_tokenizer()
    rollouts = FixedRollouts.of(tokenizer, responses)
    monkeypatch.setattr(demopsd.rollout.scored, "score_mcq", rewards_by_text(dict(zip(rollouts.texts, rewards))))
    module = build_module(validate_config(cfg), policy, tokenizer)
    module.make_rollout_engine = lambda local_rank=0: rollouts
    logged = {}
    monkeypatch.setattr(module, "log_dict", lambda metrics, **kw: logged.update(metrics))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=list))
    assert trainer.global_step == 1  # one training step, whatever its number of updates
    return module, rollouts, logged
