"""One step object per method: from scored rollouts to ``(loss, metrics)``.

:class:`DistillationStep` (demopsd, sdpo, opsd) builds each rollout's privileged context, runs the teacher on
the student's own tokens and distils it into the student through the chunked objective; it owns the teacher,
the discrepancy normaliser and the EMA update. :class:`GRPOStep` is the reference's policy-gradient baseline.
Both follow :class:`MethodStep`, so the LightningModule never asks which method it trains.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.objectives import DistillationConfig, GRPOConfig
from demopsd.config.settings import PromptConfig, RepromptConfig, SamplingConfig
from demopsd.data.rewards import MCQScore
from demopsd.data.types import MCQExample
from demopsd.objectives import (
    DiscrepancyNormalizer,
    aggregation_weights,
    chunked_distillation_loss,
    chunked_token_log_probs,
    grpo_advantages,
    grpo_loss,
    lambda_max_at,
)
from demopsd.rollout.batch import Conversation, RolloutBatch, encode_prompts
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from demopsd.runtime.sharding import reshard
from demopsd.training.reprompt import build_contexts, demonstration_fraction, teacher_prompt
from demopsd.training.teacher import ema_update, make_ema_teacher
from demopsd.training.timing import StepClock


class MethodStep(Protocol):
    """What a method does with one batch of scored rollouts."""

    teacher: nn.Module | None
    """A module the step keeps beside the policy (checkpointed and sharded with it), or None."""
    progress_bar: dict[str, str]
    """Short name on the progress bar → metric key of :meth:`__call__`."""

    def __call__(
        self,
        rollouts: RolloutBatch,
        examples: list[MCQExample],
        scores: list[MCQScore],
        global_step: int,
        clock: StepClock,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to minimise and the step's metrics; row ``r`` of ``rollouts`` answers ``examples[r]``. The
        forward passes and the loss are timed on ``clock`` (:mod:`demopsd.training.timing`)."""

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step that updated the policy."""

    def state_dict(self) -> dict:
        """Entries added to the training checkpoint."""

    def load_state_dict(self, checkpoint: dict) -> None:
        """Read back what :meth:`state_dict` added (absent keys: leave the state as it is)."""


def tempered(hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hidden states scaled so that the logits they give are divided by the rollout temperature: the trainer
    scores the distribution the rollouts were sampled from, as the reference does."""
    return hidden if temperature == 1.0 else hidden / temperature


def sampler_log_probs(rollouts: RolloutBatch, valid: torch.Tensor) -> torch.Tensor | None:
    """``log π_old`` ``[N]`` of the ``valid`` response tokens when another engine sampled them, else ``None``
    (the trainer's own detached values: sampled from the live policy, the importance ratio is 1)."""
    return None if rollouts.log_probs is None else rollouts.log_probs[valid]


def attenuation(kl_target_student: torch.Tensor, kl_teacher_student: torch.Tensor) -> torch.Tensor:
    """``KL(q‖p_S) / KL(p_T‖p_S)`` (both on the objective's support): the share of the teacher's shift the target
    passes on; 1 where the teacher does not move (both are 0), NaN when nothing was distilled."""
    ratio = kl_target_student / kl_teacher_student
    return torch.where(kl_teacher_student == 0, torch.ones_like(ratio), ratio)


def teacher_conversation(example: MCQExample, context: str, reprompt: RepromptConfig) -> Conversation:
    return [
        {"role": "system", "content": example.system},
        {"role": "user", "content": teacher_prompt(example.prompt, context, reprompt)},
    ]


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


class DistillationStep:
    """Self-distillation from a teacher that sees a privileged context (a successful sibling, or the answer).

    ``teacher_kind``: ``"ema"`` (a frozen moving-average copy of ``policy``, moved ``ema_rate`` toward it after
    every optimizer step) or ``"live"`` (the policy's current weights, no gradient).
    """

    progress_bar = {"λ": "distill/lambda_mean"}

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

    @property
    def teacher_model(self) -> nn.Module:
        return self.teacher if self.teacher is not None else self.policy

    def __call__(
        self,
        rollouts: RolloutBatch,
        examples: list[MCQExample],
        scores: list[MCQScore],
        global_step: int,
        clock: StepClock,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = [s.reward for s in scores]
        n = self.sampling.n
        response_ids, response_mask = rollouts.response_ids, rollouts.response_mask
        with clock.phase("student_forward"):
            student_hidden = response_hidden_states(self.policy, rollouts.prompt, response_ids, response_mask)
        with clock.phase("teacher_forward"):
            contexts = build_contexts(
                rollouts.texts, rewards, n, self.reprompt, answers=[e.answer for e in examples[::n]], step=global_step
            )
            has_context = torch.tensor([c is not None for c in contexts], device=response_ids.device)
            teacher_hidden = self.teacher_hidden(student_hidden, rollouts, examples, contexts)
        with clock.phase("loss"):
            loss, metrics = self.distill(
                student_hidden, teacher_hidden, rollouts, examples, scores, has_context, global_step
            )
        metrics["distill/demonstration_fraction"] = torch.tensor(demonstration_fraction(rewards, n, self.reprompt))
        return loss, metrics

    def distill(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        rollouts: RolloutBatch,
        examples: list[MCQExample],
        scores: list[MCQScore],
        has_context: torch.Tensor,
        global_step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on the rollouts with a context (``has_context`` ``[B*n]``) from the student's and the
        teacher's hidden states ``[B*n, R, H]``, and its metrics."""
        config = self.objective
        response_ids, response_mask = rollouts.response_ids, rollouts.response_mask
        distill_mask = response_mask * has_context[:, None]
        valid = response_mask.bool()
        token_weights = aggregation_weights(distill_mask, config.aggregation)[valid]
        temperature = self.sampling.temperature
        loss, stats = chunked_distillation_loss(
            tempered(student_hidden[valid], temperature),
            lm_head_weight(self.policy),
            tempered(teacher_hidden[valid], temperature),
            lm_head_weight(self.teacher_model).detach(),
            response_ids[valid],
            token_weights,
            config,
            old_log_probs=sampler_log_probs(rollouts, valid),
            lambda_max=lambda_max_at(config, global_step),
            discrepancy_scale=self.normalizer.scale if config.normalize_discrepancy else None,
            chunk_size=self.chunk_size,
        )
        teacher_p_answer, student_p_answer = self.answer_letter_probabilities(
            student_hidden, teacher_hidden, rollouts, examples, [s.predicted for s in scores], has_context
        )
        if self.teacher is not None:
            reshard(self.teacher)  # its gathered root is not needed again before the EMA update
        if has_context.any() and math.isfinite(float(stats["discrepancy_mean"])):  # a NaN would stay in its EMA
            self.normalizer.update(float(stats["discrepancy_mean"]))
        kl_ts, kl_qs = stats["kl_teacher_student"], stats["kl_target_student"]
        metrics = {
            "distill/loss": stats["loss"],
            "distill/lambda_mean": stats["lambda_mean"],
            "distill/lambda_q10": stats["lambda_q10"],
            "distill/lambda_q50": stats["lambda_q50"],
            "distill/lambda_q90": stats["lambda_q90"],
            "distill/discrepancy_mean": stats["discrepancy_mean"],
            "distill/mask_fraction": has_context.float().mean(),
            "distill/is_weight_mean": stats["is_weight_mean"],
            "distill/is_clip_fraction": stats["is_clip_fraction"],
            "leakage/kl_teacher_student": kl_ts,
            "leakage/kl_target_student": kl_qs,
            "leakage/attenuation": attenuation(kl_qs, kl_ts),
            "leakage/kl_teacher_student_full": stats["kl_teacher_student_full"],
            "leakage/teacher_p_answer": teacher_p_answer,
            "leakage/student_p_answer": student_p_answer,
            "train/entropy": stats["entropy"],
        }
        return loss, metrics

    @torch.no_grad()
    def teacher_hidden(
        self,
        student_hidden: torch.Tensor,
        rollouts: RolloutBatch,
        examples: list[MCQExample],
        contexts: list[str | None],
    ) -> torch.Tensor:
        """Teacher states ``[B*n, R, H]`` on the student's own tokens, prompted with the privileged context.

        Rows without a context are masked out of the loss; they keep the student's (detached) states.
        """
        teacher_hidden = student_hidden.detach().clone()
        rows = [i for i, c in enumerate(contexts) if c is not None]
        if not rows:
            return teacher_hidden
        prompts = encode_prompts(
            self.tokenizer,
            [teacher_conversation(examples[i], contexts[i], self.reprompt) for i in rows],
            chat_template_kwargs=self.prompts.chat_template_kwargs,
        )
        device = student_hidden.device
        prompts.ids, prompts.mask = prompts.ids.to(device), prompts.mask.to(device)
        teacher_hidden[rows] = response_hidden_states(
            self.teacher_model, prompts, rollouts.response_ids[rows], rollouts.response_mask[rows]
        )
        return teacher_hidden

    @torch.no_grad()
    def answer_letter_probabilities(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        rollouts: RolloutBatch,
        examples: list[MCQExample],
        predicted: list[str | None],
        has_context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean probability of the correct letter at the answer position under teacher and student, over the
        distilled rollouts that wrote a letter (:func:`answer_letter_positions`); NaN where there are none."""
        rows, positions, correct_ids = answer_letter_positions(
            self.tokenizer, rollouts.response_ids, rollouts.response_mask,
            [p if bool(c) else None for p, c in zip(predicted, has_context)], [e.answer for e in examples],
        )
        if not rows:
            return torch.tensor(float("nan")), torch.tensor(float("nan"))
        correct = torch.tensor(correct_ids, device=student_hidden.device)[:, None]
        probabilities = []
        for hidden, model in ((teacher_hidden, self.teacher_model), (student_hidden, self.policy)):
            states = tempered(hidden.detach()[rows, positions], self.sampling.temperature)
            log_probs = (states @ lm_head_weight(model).detach().T).float().log_softmax(-1)
            probabilities.append(log_probs.gather(-1, correct).exp().mean())
        return probabilities[0], probabilities[1]

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            ema_update(self.teacher, self.policy, self.ema_rate)

    def state_dict(self) -> dict:
        return {"discrepancy_normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        if "discrepancy_normalizer" in checkpoint:
            self.normalizer.load_state_dict(checkpoint["discrepancy_normalizer"])


class GRPOStep:
    """The reference's GRPO baseline: group-relative advantages, clipped and dual-clipped ratios, a truncated
    importance weight against the sampler when another engine sampled."""

    teacher = None
    progress_bar: dict[str, str] = {}

    def __init__(
        self, policy: PreTrainedModel, objective: GRPOConfig, sampling: SamplingConfig, *, chunk_size: int = 512
    ) -> None:
        self.policy, self.objective, self.sampling, self.chunk_size = policy, objective, sampling, chunk_size

    def __call__(
        self,
        rollouts: RolloutBatch,
        examples: list[MCQExample],
        scores: list[MCQScore],
        global_step: int,
        clock: StepClock,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with clock.phase("student_forward"):
            hidden = response_hidden_states(
                self.policy, rollouts.prompt, rollouts.response_ids, rollouts.response_mask
            )
        with clock.phase("loss"):
            return self.policy_gradient(hidden, rollouts, scores)

    def policy_gradient(
        self, hidden: torch.Tensor, rollouts: RolloutBatch, scores: list[MCQScore]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The GRPO loss from the policy's hidden states ``[B*n, R, H]`` on its rollouts, and its metrics."""
        config = self.objective
        response_ids, response_mask = rollouts.response_ids, rollouts.response_mask
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=response_ids.device)
        valid = response_mask.bool()
        log_probs, entropy = chunked_token_log_probs(
            tempered(hidden[valid], self.sampling.temperature), lm_head_weight(self.policy), response_ids[valid],
            chunk_size=self.chunk_size,
        )
        advantages = grpo_advantages(rewards, self.sampling.n, scale_by_std=config.scale_by_std)
        token_advantages = advantages[:, None].expand_as(response_mask)[valid]
        token_weights = aggregation_weights(response_mask, config.aggregation)[valid]
        loss, stats = grpo_loss(
            log_probs,
            token_advantages,
            token_weights,
            sampler_log_probs=sampler_log_probs(rollouts, valid),
            clip_low=config.clip_low,
            clip_high=config.clip_high,
            clip_ratio_c=config.clip_ratio_c,
            rollout_is_threshold=config.rollout_is_threshold,
        )
        metrics = {
            "grpo/loss": stats["loss"],
            "grpo/clip_fraction": stats["clip_fraction"],
            "grpo/sampler_weight_mean": stats["sampler_weight_mean"],
            "grpo/advantage_abs_mean": advantages.abs().mean(),
            "grpo/varied_group_fraction": (rewards.view(-1, self.sampling.n).std(-1, correction=0) > 0).float().mean(),
            "train/entropy": entropy.mean(),
        }
        return loss, metrics

    def after_optimizer_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        pass
