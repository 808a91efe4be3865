"""Held-out evaluation: k sampled answers and one greedy answer per question, scored and summarised.

Per dataset it reports, under ``eval/<dataset>/``: ``acc_avg@k`` (mean accuracy over the k samples,
SDPO's avg@16 when k = 16) and ``acc_avg_se@k`` (its standard error over questions), ``pass@k`` (unbiased
estimator), ``greedy_accuracy``, ``format_rate`` (share of well-formed sampled answers), ``entropy`` (mean
full-vocabulary token entropy of the policy on its own sampled answers) and ``response_length``; the letters the
sampled answers name, across questions (``answer_top_share``, ``answer_letter_entropy``) and per question
(``distinct_answers@k``: :mod:`demopsd.evaluation.metrics`); ``num_questions`` answered; and, per question, every
sampled text with its parsed letter, for inspection.

The *answer probe* reads the policy's belief over the option letters directly: after the question it
appends ``probe_prefix`` (an empty reasoning block and ``<answer>``) and takes the next-token
distribution restricted to the letters. On questions whose answer cannot be inferred, any confidence
there (``letter_confidence`` above chance, ``letter_entropy`` below ``log(#options)``) is leakage or
memorisation; ``overconfidence`` is confidence minus accuracy. ``probe_top_share`` is the share of the probed
questions whose most probable letter is the most common such letter: 1 when the probe prefers the same letter
whatever the question (collapse, which raises the confidence too). A forward per question, it may cover more
questions than are answered (``eval.probe_examples``, counted in ``num_probed``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import EvalConfig
from demopsd.data.rewards import score_mcq
from demopsd.data.types import MCQExample, student_conversation
from demopsd.evaluation.metrics import answer_letter_metrics, summarize_samples, top_share
from demopsd.objectives import chunked_token_log_probs
from demopsd.rollout.batch import PromptBatch, RolloutBatch, encode_prompts
from demopsd.rollout.engine import GenerateEngine, RolloutEngine
from demopsd.rollout.forward import lm_head_weight, response_hidden_states

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """``metrics``: ``eval/<dataset>/<metric>`` → value; ``samples``: one record per question."""

    dataset: str
    metrics: dict[str, float]
    samples: list[dict]


@dataclass
class BatchResult:
    """One ``generate`` batch's per-question records, with the sum and the count of its response tokens'
    entropies: a dataset's ``entropy`` is the mean over all its tokens, so batches combine by sum and count."""

    records: list[dict]
    entropy_sum: float
    token_count: int


def eval_questions(examples: list[MCQExample], dataset: str, config: EvalConfig) -> list[MCQExample]:
    """The questions of ``dataset`` that are evaluated: the first :meth:`EvalConfig.answered` are answered and the
    first :meth:`EvalConfig.probed` probed, so the longer of the two prefixes."""
    if not examples:
        raise ValueError(f"no examples to evaluate for dataset {dataset!r}")
    return examples[: max(config.answered(len(examples)), config.probed(len(examples)))]


def num_batches(examples: list[MCQExample], config: EvalConfig) -> int:
    """How many ``generate`` batches of ``config.batch_size`` questions ``examples`` make."""
    return math.ceil(len(examples) / config.batch_size)


def batch_seed(seed: int, dataset: str, index: int) -> int:
    """The sampling seed of batch ``index`` of ``dataset`` in an evaluation seeded with ``seed`` (a training
    run's seed plus the step during training): a 63-bit hash of the three, so that the answers to a question
    do not depend on the other batches, on the order the batches run in, or on which process runs them."""
    key = json.dumps([seed, dataset, index]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[MCQExample],
    dataset: str,
    config: EvalConfig,
    *,
    chat_template_kwargs: dict | None = None,
    progress: bool = True,
    rollout_engine: RolloutEngine | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``examples`` (named ``dataset`` in the metric names) in this process alone,
    sampling from the caller's random stream; :func:`demopsd.evaluation.runner.run_all` shares the batches of
    several datasets among the processes of a run and seeds each batch.

    ``rollout_engine``: what samples the answers from ``model``'s weights (default: ``generate`` on ``model``).
    """
    examples = eval_questions(examples, dataset, config)
    batches = evaluate_batches(
        model, tokenizer, examples, dataset, config, range(num_batches(examples, config)),
        chat_template_kwargs=chat_template_kwargs, progress=progress, rollout_engine=rollout_engine,
    )
    return combine(dataset, list(batches.values()), config.k)


@torch.no_grad()
def evaluate_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[MCQExample],
    dataset: str,
    config: EvalConfig,
    indices: Sequence[int],
    *,
    seeds: Callable[[int], int] | None = None,
    chat_template_kwargs: dict | None = None,
    progress: bool = True,
    rollout_engine: RolloutEngine | None = None,
) -> dict[int, BatchResult]:
    """Batch index → result, for the batches ``indices`` of ``examples``, a dataset's :func:`eval_questions` (batch
    ``i``: questions ``i * config.batch_size`` onwards). A batch's questions among the first
    :meth:`EvalConfig.answered` are answered, those among the first :meth:`EvalConfig.probed` probed. Batch ``i``
    samples after ``torch.manual_seed(seeds(i))``, or, without ``seeds``, from the caller's random stream; its
    answers do not depend on how many questions are probed. Nothing is logged for no batches."""
    if not indices:
        return {}
    engine = rollout_engine or GenerateEngine(model, tokenizer)
    size = config.batch_size
    batches = {i: examples[i * size : (i + 1) * size] for i in indices}
    answered = {i: min(max(config.answered(len(examples)) - i * size, 0), len(batches[i])) for i in indices}
    probed = {i: min(max(config.probed(len(examples)) - i * size, 0), len(batches[i])) for i in indices}
    questions, answers, probes = (sum(map(len, batches.values())), sum(answered.values()), sum(probed.values()))
    log.info("Evaluating %s: %d question%s × %d sampled answer%s%s%s%s", dataset, answers,
             "s" if answers != 1 else "", config.k, "s" if config.k > 1 else "",
             ", plus a greedy one" if config.greedy else "",
             f"; the letter probe on {probes}" if config.probe and probes != answers else "",
             f" ({questions} of its {len(examples)} in this process)" if questions < len(examples) else "")
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    results = {}
    for i, batch in tqdm(batches.items(), desc=f"eval {dataset}", unit="batch", disable=not progress, leave=False):
        if seeds is not None:
            torch.manual_seed(seeds(i))
        results[i] = evaluate_batch(model, tokenizer, engine, batch, config, chat_template_kwargs,
                                    answered=answered[i], probed=probed[i])
    model.train(was_training)
    log.info("Evaluated %s in %.0f s", dataset, time.perf_counter() - started)
    return results


def evaluate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    engine: RolloutEngine,
    batch: list[MCQExample],
    config: EvalConfig,
    chat_template_kwargs: dict | None,
    *,
    answered: int,
    probed: int,
) -> BatchResult:
    """``config.k`` sampled answers (and a greedy one, as ``config`` says) to each of the first ``answered``
    questions of ``batch``, in one ``generate`` call each, scored; the letter probe on its first ``probed``."""
    conversations = [student_conversation(e) for e in batch]
    encode = functools.partial(encode_prompts, tokenizer, chat_template_kwargs=chat_template_kwargs)
    records = [{"idx": example.idx, "answer": example.answer} for example in batch]
    entropy = torch.zeros(0)
    prompts = encode(conversations[:answered]) if answered else None
    if answered:
        sampled = engine.generate(prompts, config.sampling, entropy=True)
        entropy = (response_entropy(model, sampled, config.chunk_size) if sampled.token_entropy is None
                   else sampled.token_entropy[sampled.response_mask.bool()])
        greedy = engine.generate(prompts, config.sampling, greedy=True) if config.greedy else None
        lengths = sampled.response_mask.sum(-1).tolist()
        for i, (example, record) in enumerate(zip(batch[:answered], records)):
            rows = range(i * sampled.group_size, (i + 1) * sampled.group_size)
            record["samples"] = [answer_record(sampled.texts[r], example, lengths[r]) for r in rows]
            if greedy is not None:
                record["greedy"] = answer_record(greedy.texts[i], example, int(greedy.response_mask[i].sum()))
    if probed:
        if probed != answered:
            prompts = encode(conversations[:probed])
        letter_probs = answer_letter_probs(model, tokenizer, prompts, batch[:probed], config.probe_prefix)
        for record, probs in zip(records, letter_probs):
            record["letter_probs"] = probs
    return BatchResult(records, float(entropy.sum()), entropy.numel())


def combine(dataset: str, batches: list[BatchResult], k: int) -> EvalResult:
    """``dataset``'s result from all its batches, in order: their records and the metrics of :func:`summarize`."""
    samples = [record for batch in batches for record in batch.records]
    entropy_sum, token_count = 0.0, 0
    for batch in batches:  # in batch order, as one process sums them, so the float sum is the same
        entropy_sum, token_count = entropy_sum + batch.entropy_sum, token_count + batch.token_count
    return EvalResult(dataset, summarize(dataset, samples, k, entropy_sum / max(token_count, 1)), samples)


def response_entropy(model: PreTrainedModel, rollouts: RolloutBatch, chunk_size: int) -> torch.Tensor:
    """Full-vocabulary entropy ``[N]`` of ``model`` at each of the ``N`` response tokens of ``rollouts``, from a
    forward pass over them: for an engine that did not measure it while sampling."""
    hidden = response_hidden_states(model, rollouts.prompt, rollouts.response_ids, rollouts.response_mask)
    valid = rollouts.response_mask.bool()
    _, entropy = chunked_token_log_probs(
        hidden[valid], lm_head_weight(model), rollouts.response_ids[valid], chunk_size=chunk_size
    )
    return entropy


def answer_letter_probs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: PromptBatch, examples: list[MCQExample],
    prefix: str,
) -> list[dict[str, float]]:
    """Per example, the policy's next-token distribution after ``prompt + prefix``, renormalised over its letters.

    ``prompts`` ``[B, P]`` are the left-padded student prompts of ``examples``.
    """
    letter_ids = {letter: single_token_id(tokenizer, letter) for e in examples for letter in e.letters}
    prefix_ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt").input_ids[0]
    # one extra slot: the hidden state predicting it is the one right after the prefix
    continuation = torch.cat([prefix_ids, prefix_ids[-1:]]).to(lm_head_weight(model).device).expand(len(examples), -1)
    prompt = PromptBatch(prompts.ids.to(continuation.device), prompts.mask.to(continuation.device))
    hidden = response_hidden_states(model, prompt, continuation, torch.ones_like(continuation))[:, -1]
    log_probs = (hidden @ lm_head_weight(model).T).float().log_softmax(-1)
    probs = []
    for row, example in zip(log_probs, examples):
        letters = row[[letter_ids[letter] for letter in example.letters]].softmax(-1)
        probs.append(dict(zip(example.letters, letters.tolist())))
    return probs


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"the option letter {text!r} is {len(ids)} tokens for this tokenizer; the probe needs one")
    return ids[0]


def letter_metrics(samples: list[dict]) -> dict[str, float]:
    """Mean entropy (nats), confidence (max probability), accuracy (argmax; a tie goes to the first letter) and
    probability of the answer of the per-question letter distributions, overconfidence = confidence - accuracy,
    and the share of the questions whose argmax is the most common argmax (``probe_top_share``)."""
    entropy = confidence = accuracy = p_answer = 0.0
    top_letters = []
    for record in samples:
        probs = record["letter_probs"]
        top_letters.append(max(probs, key=probs.get))
        entropy -= sum(p * math.log(p) for p in probs.values() if p > 0)
        confidence += max(probs.values())
        accuracy += top_letters[-1] == record["answer"]
        p_answer += probs[record["answer"]]
    n = len(samples)
    return {"letter_entropy": entropy / n, "letter_confidence": confidence / n, "letter_accuracy": accuracy / n,
            "letter_p_answer": p_answer / n, "overconfidence": (confidence - accuracy) / n,
            "probe_top_share": top_share(top_letters)}


def answer_record(text: str, example: MCQExample, length: int) -> dict:
    score = score_mcq(text, example.answer, example.letters, example.reward_rule)
    return {"text": text, "predicted": score.predicted, "correct": score.correct,
            "well_formed": score.well_formed, "length": length}


def summarize(dataset: str, samples: list[dict], k: int, entropy: float) -> dict[str, float]:
    """The ``eval/<dataset>/...`` metrics of per-question ``samples`` records (see :func:`evaluate`): those with
    ``samples`` were answered, those with ``letter_probs`` probed."""
    answered = [record for record in samples if "samples" in record]
    probed = [record for record in samples if "letter_probs" in record]
    sampled = [s for record in answered for s in record["samples"]]
    metrics = dict(summarize_samples([[s["correct"] for s in record["samples"]] for record in answered], k))
    metrics.update(answer_letter_metrics([[s["predicted"] for s in record["samples"]] for record in answered], k))
    metrics["format_rate"] = sum(s["well_formed"] for s in sampled) / len(sampled)
    metrics["response_length"] = sum(s["length"] for s in sampled) / len(sampled)
    metrics["entropy"] = entropy
    if probed:
        metrics.update(letter_metrics(probed))
        metrics["num_probed"] = float(len(probed))
    if all("greedy" in record for record in answered):
        metrics["greedy_accuracy"] = sum(record["greedy"]["correct"] for record in answered) / len(answered)
    metrics["num_questions"] = float(len(answered))
    return {f"eval/{dataset}/{name}": float(value) for name, value in metrics.items()}


def write_results(results: list[EvalResult], out_dir: str | Path, config: EvalConfig, **context) -> Path:
    """``summary.json`` (metrics, settings, ``context`` such as the step) and ``samples.jsonl`` in ``out_dir``.

    Each file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {name: value for result in results for name, value in result.metrics.items()}
    summary = {**context, "config": asdict(config), "metrics": metrics}
    write_atomically(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = (json.dumps({"dataset": r.dataset, **record}) for r in results for record in r.samples)
    write_atomically(out_dir / "samples.jsonl", "".join(line + "\n" for line in lines))
    return out_dir / "summary.json"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
