"""One step object per method: from scored rollouts to the loss of each micro-batch and the step's metrics.

:class:`DistillationStep` (demopsd, sdpo, opsd) builds each rollout's privileged context, runs the teacher on
the student's own tokens and distils it into the student through the chunked objective; it owns the teacher,
the discrepancy normaliser and the EMA update. :class:`GRPOStep` is the reference's policy-gradient baseline.
Both follow :class:`MethodStep`, so the LightningModule never asks which method it trains: it calls
:meth:`~MethodStep.begin` once per step, :meth:`~MethodStep.micro_batch_loss` for every micro-batch of every
mini-batch (:mod:`demopsd.training.batching`), back-propagating each, and :meth:`~MethodStep.end` for the metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.objectives import DistillationConfig, GRPOConfig
from demopsd.config.settings import PromptConfig, RepromptConfig, SamplingConfig
from demopsd.data.rewards import MCQScore
from demopsd.data.types import MCQExample, student_conversation
from demopsd.objectives import (
    DiscrepancyNormalizer,
    aggregation_weights,
    chunked_distillation,
    chunked_token_log_probs,
    grpo_advantages,
    grpo_loss,
    lambda_max_at,
    summarize,
)
from demopsd.rollout.batch import Conversation, PromptBatch, RolloutBatch, encode_prompts
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from demopsd.runtime.sharding import reshard
from demopsd.training.batching import select_prompts, select_rows
from demopsd.training.reprompt import build_contexts, demonstration_fraction, teacher_prompt
from demopsd.training.teacher import ema_update, make_ema_teacher
from demopsd.training.timing import StepClock


@dataclass
class StepBatch:
    """A step's scored rollouts: row ``r`` of ``rollouts`` answers ``examples[r]`` and scored ``scores[r]``.
    ``old_log_probs`` ``[B*n, R]``: the policy's log-probabilities of the response tokens recorded before the
    step's first update, when it makes several (else ``None``: each update's own detached values)."""

    rollouts: RolloutBatch
    examples: list[MCQExample]
    scores: list[MCQScore]
    global_step: int
    old_log_probs: torch.Tensor | None = None


class MethodStep(Protocol):
    """What a method does with one batch of scored rollouts."""

    teacher: nn.Module | None
    """A module the step keeps beside the policy (checkpointed and sharded with it), or None."""
    progress_bar: dict[str, str]
    """Short name on the progress bar → metric key of :meth:`end`."""

    @classmethod
    def from_settings(cls, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings) -> MethodStep:
        """The step a run's :class:`~demopsd.config.run.TrainSettings` describes (the method registry names the
        class of each ``method.kind``: :data:`demopsd.config.methods.METHODS`)."""

    def begin(self, batch: StepBatch) -> None:
        """Prepare the step's work on ``batch`` (contexts, advantages) before its first micro-batch."""

    def micro_batch_loss(self, mini_batch: range, micro_batch: range, clock: StepClock) -> torch.Tensor:
        """The share of the rows ``micro_batch`` in the loss of the mini-batch ``mini_batch`` (row ranges of the
        step's batch); a mini-batch's loss is the sum of its micro-batches' shares. The forward passes and the
        loss are timed on ``clock`` (:mod:`demopsd.training.timing`)."""

    def end(self) -> dict[str, torch.Tensor]:
        """The step's metrics over all its micro-batches and updates; forgets the step's work."""

    def after_optimizer_step(self) -> None:
        """Called once per step after its updates, if any of them changed the policy."""

    def state_dict(self) -> dict:
        """Entries added to the training checkpoint."""

    def load_state_dict(self, checkpoint: dict) -> None:
        """Read back what :meth:`state_dict` added (absent keys: leave the state as it is)."""


def tempered(hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hidden states scaled so that the logits they give are divided by the rollout temperature: the trainer
    scores the distribution the rollouts were sampled from, as the reference does."""
    return hidden if temperature == 1.0 else hidden / temperature


def recorded_rows(batch: StepBatch, rows: range, valid: torch.Tensor) -> torch.Tensor | None:
    """The log-probabilities ``[N]`` recorded before the step's first update for the ``valid`` ``[m, R']``
    response tokens of the rows ``rows``; ``None`` when the step recorded none (one update)."""
    if batch.old_log_probs is None:
        return None
    return batch.old_log_probs[rows.start:rows.stop, : valid.shape[1]][valid]


def old_log_probs(batch: StepBatch, rows: range, part: RolloutBatch) -> torch.Tensor | None:
    """``log π_old`` ``[N]`` of the response tokens of ``part`` (the rows ``rows`` of ``batch``): the sampler's
    when another engine sampled them (vLLM), else those recorded before the step's first update, else ``None``
    (each update's own detached values: one update on rollouts of the live policy, the ratio is 1)."""
    valid = part.response_mask.bool()
    if part.log_probs is not None:
        return part.log_probs[valid]
    return recorded_rows(batch, rows, valid)


@torch.no_grad()
def recorded_log_probs(
    policy: PreTrainedModel, rollouts: RolloutBatch, micro_batches: list[range], temperature: float,
    chunk_size: int = 512,
) -> torch.Tensor:
    """The policy's log-probabilities ``[B*n, R]`` of every response token (0 at padding) at the temperature
    the rollouts were sampled at, computed micro-batch by micro-batch (``micro_batches`` cover the rows)."""
    values = None
    for rows in micro_batches:
        part = select_rows(rollouts, rows)
        valid = part.response_mask.bool()
        hidden = response_hidden_states(policy, part.prompt, part.response_ids, part.response_mask)
        log_probs, _ = chunked_token_log_probs(
            tempered(hidden[valid], temperature), lm_head_weight(policy), part.response_ids[valid], chunk_size
        )
        if values is None:
            values = torch.zeros(rollouts.response_ids.shape, dtype=log_probs.dtype, device=log_probs.device)
        values[rows.start:rows.stop, : valid.shape[1]][valid] = log_probs
    reshard(policy)
    return values


def loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the losses are computed in: float32, or float64 for float64 states (half precision upcast)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def mini_batch_weights(mini_batch: range, micro_batch: range, mask: torch.Tensor,
                       aggregation: str, width: int) -> torch.Tensor:
    """The aggregation weights ``[m, width]`` of the rows ``micro_batch``, computed over the whole mini-batch
    (``mask`` ``[B*n, R]`` of the step's rows, in the loss's floating dtype), so that the micro-batches' losses add
    up to the mini-batch's."""
    weights = aggregation_weights(mask[mini_batch.start:mini_batch.stop], aggregation)
    return weights[micro_batch.start - mini_batch.start: micro_batch.stop - mini_batch.start, :width]


def attenuation(kl_target_student: torch.Tensor, kl_teacher_student: torch.Tensor) -> torch.Tensor:
    """``KL(q‖p_S) / KL(p_T‖p_S)`` (both on the objective's support): the share of the teacher's shift the target
    passes on; 1 where the teacher does not move (both are 0), NaN when nothing was distilled."""
    ratio = kl_target_student / kl_teacher_student
    return torch.where(kl_teacher_student == 0, torch.ones_like(ratio), ratio)


def teacher_conversation(example: MCQExample, context: str, reprompt: RepromptConfig) -> Conversation:
    """The student's chat (its system prompt, where the task has one) with the privileged context in the question."""
    *system, _ = student_conversation(example)
    return [*system, {"role": "user", "content": teacher_prompt(example.prompt, context, reprompt)}]


def answer_letter_positions(
    tokenizer: PreTrainedTokenizerBase,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    predicted: list[str | None],
    answers: list[str],
) -> tuple[list[int], list[int], list[int]]:
    """Where each rollout wrote its answer letter, and the token of the correct letter written the same way.

    For row ``r`` with a parsed letter ``predicted[r]``: the last response position whose token is that letter
    alone or after one space (``"B"``, ``" B"``), and the token id of ``answers[r]`` in the same form. Rows with
    no letter, or whose letter token has no single-token counterpart, are left out. Returns
    ``(rows, positions, correct_token_ids)``.
    """
    rows, positions, correct_ids = [], [], []
    for row, (letter, answer) in enumerate(zip(predicted, answers)):
        if letter is None:
            continue
        forms = {ids[0]: prefix for prefix in ("", " ")
                 if len(ids := tokenizer(prefix + letter, add_special_tokens=False).input_ids) == 1}
        length = int(response_mask[row].sum())
        hits = [t for t in range(length) if int(response_ids[row, t]) in forms]
        if not hits:
            continue
        correct = tokenizer(forms[int(response_ids[row, hits[-1]])] + answer, add_special_tokens=False).input_ids
        if len(correct) == 1:
            rows.append(row)
            positions.append(hits[-1])
            correct_ids.append(correct[0])
    return rows, positions, correct_ids


@dataclass
class _DistillationWork:
    """What :class:`DistillationStep` keeps between the micro-batches of one step."""

    batch: StepBatch
    has_context: torch.Tensor  # [B*n] bool
    distill_mask: torch.Tensor  # [B*n, R]: response tokens of the rows with a context
    teacher_prompts: PromptBatch | None  # of the rows with a context, in row order
    teacher_row: dict[int, int]  # row of the batch → its row of teacher_prompts
    lambda_max: float
    discrepancy_scale: float | None
    update_losses: dict[int, torch.Tensor] = field(default_factory=dict)  # mini-batch start → its loss
    token_stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    token_weights: list[torch.Tensor] = field(default_factory=list)
    p_answer: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (teacher, student) per row


class DistillationStep:
    """Self-distillation from a teacher that sees a privileged context (a successful sibling, or the answer).

    ``teacher_kind``: ``"ema"`` (a frozen moving-average copy of ``policy``, moved ``ema_rate`` toward it after
    every step that updated the policy) or ``"live"`` (the policy's current weights, no gradient).
    """

    progress_bar = {"λ": "distill/lambda_mean"}

    @classmethod
    def from_settings(cls, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings) -> DistillationStep:
        """The step of a run's :class:`~demopsd.config.run.TrainSettings` (its method a ``DistillMethodConfig``)."""
        method = settings.method
        return cls(policy, tokenizer, method.objective, settings.rollout, method.reprompt,
                   teacher_kind=method.teacher, ema_rate=method.ema_rate, prompts=settings.prompts)

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: DistillationConfig,
        sampling: SamplingConfig,
        reprompt: RepromptConfig,
        *,
        teacher_kind: str = "ema",
        ema_rate: float = 0.05,
        prompts: PromptConfig | None = None,
        chunk_size: int = 512,
    ) -> None:
        self.policy, self.tokenizer, self.objective, self.sampling = policy, tokenizer, objective, sampling
        self.reprompt, self.ema_rate = reprompt, ema_rate
        self.prompts, self.chunk_size = prompts or PromptConfig(), chunk_size
        self.teacher = make_ema_teacher(policy) if teacher_kind == "ema" else None
        self.normalizer = DiscrepancyNormalizer(objective.normalize_momentum)
        self.work: _DistillationWork | None = None

    @property
    def teacher_model(self) -> nn.Module:
        return self.teacher if self.teacher is not None else self.policy

    def begin(self, batch: StepBatch) -> None:
        """Each rollout's privileged context (:func:`build_contexts`) and the teacher's prompts with it, cut at
        ``method.reprompt.max_prompt_tokens`` as ``method.reprompt.truncation`` says (the reference's: on the right)."""
        rewards, n = [s.reward for s in batch.scores], batch.rollouts.group_size
        contexts = build_contexts(
            batch.rollouts.texts, rewards, n, self.reprompt, answers=[e.answer for e in batch.examples[::n]],
            step=batch.global_step,
        )
        rows = [i for i, c in enumerate(contexts) if c is not None]
        device = batch.rollouts.response_ids.device
        teacher_prompts = None
        if rows:
            teacher_prompts = encode_prompts(
                self.tokenizer,
                [teacher_conversation(batch.examples[i], contexts[i], self.reprompt) for i in rows],
                max_tokens=self.reprompt.max_prompt_tokens,
                truncation=self.reprompt.truncation,
                chat_template_kwargs=self.prompts.chat_template_kwargs,
            )
            teacher_prompts.ids, teacher_prompts.mask = teacher_prompts.ids.to(device), teacher_prompts.mask.to(device)
        config = self.objective
        has_context = torch.tensor([c is not None for c in contexts], device=device)
        self.work = _DistillationWork(
            batch=batch,
            has_context=has_context,
            distill_mask=batch.rollouts.response_mask * has_context[:, None],
            teacher_prompts=teacher_prompts,
            teacher_row={row: i for i, row in enumerate(rows)},
            lambda_max=lambda_max_at(config, batch.global_step),
            discrepancy_scale=self.normalizer.scale if config.normalize_discrepancy else None,
        )

    def micro_batch_loss(self, mini_batch: range, micro_batch: range, clock: StepClock) -> torch.Tensor:
        work, config = self.work, self.objective
        part = select_rows(work.batch.rollouts, micro_batch)
        with clock.phase("student_forward"):
            student_hidden = response_hidden_states(self.policy, part.prompt, part.response_ids, part.response_mask)
        with clock.phase("teacher_forward"):
            teacher_hidden = self.teacher_hidden(student_hidden, part, micro_batch)
        with clock.phase("loss"):
            valid = part.response_mask.bool()
            token_weights = mini_batch_weights(
                mini_batch, micro_batch, work.distill_mask.to(loss_dtype(student_hidden)), config.aggregation,
                valid.shape[1],
            )[valid]
            temperature = self.sampling.temperature
            loss, stats = chunked_distillation(
                tempered(student_hidden[valid], temperature),
                lm_head_weight(self.policy),
                tempered(teacher_hidden[valid], temperature),
                lm_head_weight(self.teacher_model).detach(),
                part.response_ids[valid],
                token_weights,
                config,
                old_log_probs=old_log_probs(work.batch, micro_batch, part),
                lambda_max=work.lambda_max,
                discrepancy_scale=work.discrepancy_scale,
                chunk_size=self.chunk_size,
            )
            work.p_answer.extend(self.answer_letter_probabilities(student_hidden, teacher_hidden, part, micro_batch))
            if self.teacher is not None:
                reshard(self.teacher)  # its gathered root is not needed again before the next micro-batch
        work.update_losses[mini_batch.start] = work.update_losses.get(mini_batch.start, 0) + loss.detach()
        work.token_stats.append(stats)
        work.token_weights.append(token_weights)
        return loss

    def end(self) -> dict[str, torch.Tensor]:
        """The step's metrics over all its micro-batches; the discrepancy normaliser moves once per step."""
        work, self.work = self.work, None
        stats = {name: torch.cat([s[name] for s in work.token_stats]) for name in work.token_stats[0]}
        token_weights = torch.cat(work.token_weights)
        loss = torch.stack(list(work.update_losses.values())).mean()
        summary = summarize(loss, stats, token_weights)
        if work.has_context.any() and math.isfinite(float(summary["discrepancy_mean"])):  # a NaN would stay in its EMA
            self.normalizer.update(float(summary["discrepancy_mean"]))
        nan = torch.tensor(float("nan"))
        teacher_p_answer, student_p_answer = (
            torch.stack([p for p, _ in work.p_answer]).mean() if work.p_answer else nan,
            torch.stack([p for _, p in work.p_answer]).mean() if work.p_answer else nan,
        )
        kl_ts, kl_qs = summary["kl_teacher_student"], summary["kl_target_student"]
        rewards = [s.reward for s in work.batch.scores]
        return {
            "distill/loss": summary["loss"],
            "distill/lambda_mean": summary["lambda_mean"],
            "distill/lambda_q10": summary["lambda_q10"],
            "distill/lambda_q50": summary["lambda_q50"],
            "distill/lambda_q90": summary["lambda_q90"],
            "distill/discrepancy_mean": summary["discrepancy_mean"],
            "distill/mask_fraction": work.has_context.float().mean(),
            "distill/is_weight_mean": summary["is_weight_mean"],
            "distill/is_clip_fraction": summary["is_clip_fraction"],
            "distill/demonstration_fraction": torch.tensor(
                demonstration_fraction(rewards, work.batch.rollouts.group_size, self.reprompt)
            ),
            "leakage/kl_teacher_student": kl_ts,
            "leakage/kl_target_student": kl_qs,
            "leakage/attenuation": attenuation(kl_qs, kl_ts),
            "leakage/kl_teacher_student_full": summary["kl_teacher_student_full"],
            "leakage/teacher_p_answer": teacher_p_answer,
            "leakage/student_p_answer": student_p_answer,
            "train/entropy": summary["entropy"],
        }

    @torch.no_grad()
    def teacher_hidden(self, student_hidden: torch.Tensor, part: RolloutBatch, rows: range) -> torch.Tensor:
        """Teacher states ``[m, R, H]`` on the student's own tokens of ``part`` (the rows ``rows`` of the step),
        prompted with the privileged context.

        Rows without a context are masked out of the loss; they keep the student's (detached) states.
        """
        teacher_hidden = student_hidden.detach().clone()
        work = self.work
        with_context = [i for i, row in enumerate(rows) if row in work.teacher_row]
        if not with_context:
            return teacher_hidden
        prompts = select_prompts(work.teacher_prompts, [work.teacher_row[rows[i]] for i in with_context])
        teacher_hidden[with_context] = response_hidden_states(
            self.teacher_model, prompts, part.response_ids[with_context], part.response_mask[with_context]
        )
        return teacher_hidden

    @torch.no_grad()
    def answer_letter_probabilities(
        self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, part: RolloutBatch, rows: range
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The probability of the correct letter at the answer position under teacher and student, for each
        distilled rollout of ``part`` (the rows ``rows`` of the step) that wrote a letter
        (:func:`answer_letter_positions`)."""
        work = self.work
        examples, scores = work.batch.examples[rows.start:rows.stop], work.batch.scores[rows.start:rows.stop]
        found, positions, correct_ids = answer_letter_positions(
            self.tokenizer, part.response_ids, part.response_mask,
            [s.predicted if bool(work.has_context[row]) else None for s, row in zip(scores, rows)],
            [e.answer for e in examples],
        )
        if not found:
            return []
        correct = torch.tensor(correct_ids, device=student_hidden.device)[:, None]
        probabilities = []
        for hidden, model in ((teacher_hidden, self.teacher_model), (student_hidden, self.policy)):
            states = tempered(hidden.detach()[found, positions], self.sampling.temperature)
            log_probs = (states @ lm_head_weight(model).detach().T).float().log_softmax(-1)
            probabilities.append(log_probs.gather(-1, correct).exp()[:, 0])
        return list(zip(probabilities[0], probabilities[1]))

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.policy, self.ema_rate)

    def state_dict(self) -> dict:
        return {"discrepancy_normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        if "discrepancy_normalizer" in checkpoint:
            self.normalizer.load_state_dict(checkpoint["discrepancy_normalizer"])


@dataclass
class _GRPOWork:
    """What :class:`GRPOStep` keeps between the micro-batches of one step."""

    batch: StepBatch
    rewards: torch.Tensor  # [B*n]
    advantages: torch.Tensor  # [B*n]
    update_losses: dict[int, torch.Tensor] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # token-count-weighted sums of token means
    tokens: int = 0  # response tokens seen


class GRPOStep:
    """The reference's GRPO baseline: group-relative advantages, clipped and dual-clipped ratios, a truncated
    importance weight against the sampler when another engine sampled."""

    teacher = None
    progress_bar: dict[str, str] = {}
    TOKEN_MEANS = {"grpo/clip_fraction": "clip_fraction", "grpo/clip_fraction_lower": "clip_fraction_lower",
                   "grpo/ratio_mean": "ratio_mean", "grpo/sampler_weight_mean": "sampler_weight_mean"}

    @classmethod
    def from_settings(cls, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings) -> GRPOStep:
        """The step of a run's :class:`~demopsd.config.run.TrainSettings` (its method a ``GRPOMethodConfig``)."""
        return cls(policy, settings.method.objective, settings.rollout)

    def __init__(
        self, policy: PreTrainedModel, objective: GRPOConfig, sampling: SamplingConfig, *, chunk_size: int = 512
    ) -> None:
        self.policy, self.objective, self.sampling, self.chunk_size = policy, objective, sampling, chunk_size
        self.work: _GRPOWork | None = None

    def begin(self, batch: StepBatch) -> None:
        """Group-relative advantages of the whole step's rollouts (every mini-batch uses the same ones)."""
        device = batch.rollouts.response_ids.device
        rewards = torch.tensor([s.reward for s in batch.scores], dtype=torch.float32, device=device)
        advantages = grpo_advantages(rewards, batch.rollouts.group_size, scale_by_std=self.objective.scale_by_std)
        self.work = _GRPOWork(batch=batch, rewards=rewards, advantages=advantages)

    def micro_batch_loss(self, mini_batch: range, micro_batch: range, clock: StepClock) -> torch.Tensor:
        work, config = self.work, self.objective
        part = select_rows(work.batch.rollouts, micro_batch)
        with clock.phase("student_forward"):
            hidden = response_hidden_states(self.policy, part.prompt, part.response_ids, part.response_mask)
        with clock.phase("loss"):
            valid = part.response_mask.bool()
            log_probs, entropy = chunked_token_log_probs(
                tempered(hidden[valid], self.sampling.temperature), lm_head_weight(self.policy),
                part.response_ids[valid], chunk_size=self.chunk_size,
            )
            advantages = work.advantages[micro_batch.start:micro_batch.stop]
            token_weights = mini_batch_weights(
                mini_batch, micro_batch, work.batch.rollouts.response_mask.to(log_probs.dtype), config.aggregation,
                valid.shape[1],
            )[valid]
            loss, stats = grpo_loss(
                log_probs,
                advantages[:, None].expand_as(valid)[valid],
                token_weights,
                old_log_probs=recorded_rows(work.batch, micro_batch, valid),
                sampler_log_probs=None if part.log_probs is None else part.log_probs[valid],
                clip_low=config.clip_low,
                clip_high=config.clip_high,
                clip_ratio_c=config.clip_ratio_c,
                rollout_is_threshold=config.rollout_is_threshold,
            )
        counted = int((token_weights > 0).sum())
        for name, key in self.TOKEN_MEANS.items():
            work.sums[name] = work.sums.get(name, 0) + stats[key].detach() * counted
        work.sums["train/entropy"] = work.sums.get("train/entropy", 0) + entropy.sum()
        work.tokens += counted
        work.update_losses[mini_batch.start] = work.update_losses.get(mini_batch.start, 0) + loss.detach()
        return loss

    def end(self) -> dict[str, torch.Tensor]:
        work, self.work = self.work, None
        tokens = max(work.tokens, 1)
        return {
            "grpo/loss": torch.stack(list(work.update_losses.values())).mean(),
            **{name: total / tokens for name, total in work.sums.items()},
            "grpo/advantage_abs_mean": work.advantages.abs().mean(),
            "grpo/varied_group_fraction": (
                work.rewards.view(-1, work.batch.rollouts.group_size).std(-1, correction=0) > 0
            ).float().mean(),
        }

    def after_optimizer_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        pass
