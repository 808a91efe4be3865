"""The LightningModule: one training step calls the tested pieces in order and logs what they measured.

prompts → rollouts → rewards → privileged contexts → teacher / student hidden states → objective →
optimizer step (Lightning) → EMA teacher update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.data import MCQExample, student_conversation
from demopsd.forward import lm_head_weight, response_hidden_states
from demopsd.guards import step_was_skipped
from demopsd.objectives import (
    DiscrepancyNormalizer,
    DistillationConfig,
    GRPOConfig,
    aggregation_weights,
    chunked_distillation_loss,
    chunked_token_log_probs,
    grpo_advantages,
    grpo_loss,
    lambda_max_at,
)
from demopsd.reprompt import RepromptConfig, build_contexts, teacher_prompt
from demopsd.rewards import score_mcq
from demopsd.rollout import Conversation, PromptBatch, RolloutBatch, encode_prompts, sample_rollouts
from demopsd.settings import TEACHER_KINDS, OptimConfig, PromptConfig, SamplingConfig, ShardingConfig
from demopsd.sharding import fsdp_units, gathered, reshard, shard_model
from demopsd.teacher import ema_update, make_ema_teacher

if TYPE_CHECKING:
    from demopsd.vllm_rollout import VLLMRollouts

def teacher_conversation(example: MCQExample, context: str, reprompt: RepromptConfig) -> Conversation:
    return [
        {"role": "system", "content": example.system},
        {"role": "user", "content": teacher_prompt(example.prompt, context, reprompt)},
    ]


def attenuation(kl_target_student: torch.Tensor, kl_teacher_student: torch.Tensor) -> torch.Tensor:
    """``KL(q‖p_S) / KL(p_T‖p_S)`` (both on the objective's support): the share of the teacher's shift the target
    passes on; 1 where the teacher does not move (both are 0), NaN when nothing was distilled."""
    ratio = kl_target_student / kl_teacher_student
    return torch.where(kl_teacher_student == 0, torch.ones_like(ratio), ratio)


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


def sampler_log_probs(rollouts: RolloutBatch, valid: torch.Tensor) -> torch.Tensor | None:
    """``log π_old`` ``[N]`` of the ``valid`` response tokens when another engine sampled them, else ``None``
    (the trainer's own detached values: sampled from the live policy, the importance ratio is 1)."""
    return None if rollouts.log_probs is None else rollouts.log_probs[valid]


class SelfDistillationModule(L.LightningModule):
    """Trains ``policy`` on-policy with a self-distillation objective (demopsd/sdpo/opsd) or GRPO.

    ``objective`` is a :class:`DistillationConfig` (then ``reprompt`` and ``teacher`` are used) or a
    :class:`GRPOConfig`. ``teacher`` is ``"ema"`` (a frozen moving-average copy, updated with
    ``ema_rate`` after every optimizer step) or ``"live"`` (the policy's current weights, no gradient).
    ``make_rollout_engine``: builds, given the process's ``local_rank``, the vLLM engine that samples the rollouts
    (the policy's weights are pushed into it before the first rollout after each update); it is called in
    :meth:`setup`, once the training processes are connected. ``None`` samples with ``generate`` on the policy.
    ``sharding``: how :meth:`configure_model` shards the policy and the teacher under ``trainer=fsdp``.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        objective: DistillationConfig | GRPOConfig,
        sampling: SamplingConfig,
        *,
        reprompt: RepromptConfig | None = None,
        teacher: str = "ema",
        ema_rate: float = 0.05,
        optim: OptimConfig | None = None,
        prompts: PromptConfig | None = None,
        chunk_size: int = 512,
        make_rollout_engine: Callable[..., VLLMRollouts] | None = None,
        sharding: ShardingConfig | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy.train()  # from_pretrained returns eval mode; rollouts switch to eval themselves
        self.tokenizer = tokenizer
        self.objective = objective
        self.sampling = sampling
        self.optim = optim or OptimConfig()
        self.prompts = prompts or PromptConfig()
        self.chunk_size = chunk_size
        self.make_rollout_engine = make_rollout_engine
        self.rollout_engine: VLLMRollouts | None = None
        self.sharding = sharding or ShardingConfig()
        self._engine_is_stale = True  # the engine's weights are the checkpoint's, not (say) a resumed run's
        self.distills = isinstance(objective, DistillationConfig)
        if self.distills:
            if teacher not in TEACHER_KINDS:
                raise ValueError(f"method.teacher={teacher!r} is invalid: one of {TEACHER_KINDS} is accepted")
            if reprompt is None:
                raise ValueError("a distillation objective needs a RepromptConfig for the privileged context")
            self.reprompt = reprompt
            self.teacher_kind = teacher
            self.ema_rate = ema_rate
            self.teacher = make_ema_teacher(policy) if teacher == "ema" else None
            self.normalizer = DiscrepancyNormalizer(objective.normalize_momentum)
        self._step_started = 0.0
        self._loss_nonfinite = False  # this step's loss was NaN/inf: no optimizer, EMA or scheduler step

    # ------------------------------------------------------------------ training step
    def training_step(self, batch: list[MCQExample], batch_idx: int) -> torch.Tensor | None:
        """The loss of one batch; ``None`` (Lightning skips backward and the update) when it is not finite."""
        self._step_started = time.perf_counter()
        self._loss_nonfinite = False
        prompts = encode_prompts(
            self.tokenizer,
            [student_conversation(e) for e in batch],
            max_tokens=self.prompts.max_prompt_tokens,
            chat_template_kwargs=self.prompts.chat_template_kwargs,
        )
        rollouts = self._rollouts(prompts)
        examples = [e for e in batch for _ in range(self.sampling.n)]
        scores = [score_mcq(text, e.answer, e.letters, e.reward_rule) for text, e in zip(rollouts.texts, examples)]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device)

        metrics = {
            "train/reward_mean": rewards.mean(),
            "train/accuracy": torch.tensor([s.correct for s in scores], dtype=torch.float32).mean(),
            "train/format_rate": torch.tensor([s.well_formed for s in scores], dtype=torch.float32).mean(),
            "train/response_length": rollouts.response_mask.sum(-1).float().mean(),
            "perf/rollout_seconds": torch.tensor(rollouts.seconds),
            "perf/rollout_tokens_per_s": torch.tensor(rollouts.num_tokens / max(rollouts.seconds, 1e-9)),
        }
        if self.distills:
            loss, step_metrics = self._distillation_step(rollouts, examples, rewards, [s.predicted for s in scores])
        else:
            loss, step_metrics = self._grpo_step(rollouts, rewards)
        metrics.update(step_metrics)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        self.log_dict(  # under DDP each metric is the mean over the ranks
            {k: v.float() for k, v in metrics.items()}, on_step=True, batch_size=len(examples), sync_dist=distributed
        )
        self.log("reward", metrics["train/reward_mean"].float(), prog_bar=True, logger=False, batch_size=len(examples))
        if self.distills:
            self.log("λ", metrics["distill/lambda_mean"].float(), prog_bar=True, logger=False, batch_size=len(examples))
        if not torch.isfinite(loss.detach()):
            self._loss_nonfinite = True  # counted and warned about by guards.NumericalGuard
            # Under DDP every rank must take part in the gradient all-reduce: the non-finite gradients
            # then reach every rank, and the guard skips the step everywhere.
            return loss if distributed else None
        return loss

    def _rollouts(self, prompts: PromptBatch) -> RolloutBatch:
        engine = self.synced_rollout_engine()
        with nullcontext() if engine else gathered(self.policy):
            return sample_rollouts(self.policy, self.tokenizer, prompts, self.sampling, engine)

    def synced_rollout_engine(self) -> VLLMRollouts | None:
        """The vLLM engine with the policy's current weights (pushed if they changed since), or ``None``."""
        if self.rollout_engine is not None and self._engine_is_stale:
            self.rollout_engine.load_weights(self.policy)
            self._engine_is_stale = False
        return self.rollout_engine

    def _distillation_step(
        self, rollouts: RolloutBatch, examples: list[MCQExample], rewards: torch.Tensor, predicted: list[str | None]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config: DistillationConfig = self.objective
        contexts = build_contexts(
            rollouts.texts,
            rewards.tolist(),
            self.sampling.n,
            self.reprompt,
            answers=[e.answer for e in examples[:: self.sampling.n]],
            step=self.global_step,
        )
        has_context = torch.tensor([c is not None for c in contexts], device=self.device)
        response_ids, response_mask = rollouts.response_ids, rollouts.response_mask
        distill_mask = response_mask * has_context[:, None]

        started = time.perf_counter()
        student_hidden = response_hidden_states(self.policy, rollouts.prompt, response_ids, response_mask)
        teacher_hidden = self._teacher_hidden(student_hidden, rollouts, examples, contexts)
        teacher_seconds = time.perf_counter() - started

        started = time.perf_counter()
        valid = response_mask.bool()
        token_weights = aggregation_weights(distill_mask, config.aggregation)[valid]
        teacher_model = self.teacher if self.teacher is not None else self.policy
        loss, stats = chunked_distillation_loss(
            self._tempered(student_hidden[valid]),
            lm_head_weight(self.policy),
            self._tempered(teacher_hidden[valid]),
            lm_head_weight(teacher_model).detach(),
            response_ids[valid],
            token_weights,
            config,
            old_log_probs=sampler_log_probs(rollouts, valid),
            lambda_max=lambda_max_at(config, self.global_step),
            discrepancy_scale=self.normalizer.scale if config.normalize_discrepancy else None,
            chunk_size=self.chunk_size,
        )
        teacher_p_answer, student_p_answer = self._answer_letter_probabilities(
            student_hidden, teacher_hidden, rollouts, examples, predicted, has_context
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
            "perf/teacher_seconds": torch.tensor(teacher_seconds),
            "perf/student_seconds": torch.tensor(time.perf_counter() - started),
        }
        return loss, metrics

    @torch.no_grad()
    def _answer_letter_probabilities(
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
        teacher_model = self.teacher if self.teacher is not None else self.policy
        probabilities = []
        for hidden, model in ((teacher_hidden, teacher_model), (student_hidden, self.policy)):
            states = self._tempered(hidden.detach()[rows, positions])
            log_probs = (states @ lm_head_weight(model).detach().T).float().log_softmax(-1)
            probabilities.append(log_probs.gather(-1, correct).exp().mean())
        return probabilities[0], probabilities[1]

    @torch.no_grad()
    def _teacher_hidden(
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
        prompts.ids, prompts.mask = prompts.ids.to(self.device), prompts.mask.to(self.device)
        model = self.teacher if self.teacher is not None else self.policy
        teacher_hidden[rows] = response_hidden_states(
            model, prompts, rollouts.response_ids[rows], rollouts.response_mask[rows]
        )
        return teacher_hidden

    def _grpo_step(self, rollouts: RolloutBatch, rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config: GRPOConfig = self.objective
        started = time.perf_counter()
        response_ids, response_mask = rollouts.response_ids, rollouts.response_mask
        valid = response_mask.bool()
        hidden = response_hidden_states(self.policy, rollouts.prompt, response_ids, response_mask)
        log_probs, entropy = chunked_token_log_probs(
            self._tempered(hidden[valid]), lm_head_weight(self.policy), response_ids[valid], chunk_size=self.chunk_size
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
            "train/entropy": entropy.mean(),
            "perf/student_seconds": torch.tensor(time.perf_counter() - started),
        }
        return loss, metrics

    def _tempered(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states scaled so that the logits they give are divided by the rollout temperature: the
        trainer scores the distribution the rollouts were sampled from, as the reference does."""
        return hidden if self.sampling.temperature == 1.0 else hidden / self.sampling.temperature

    # ------------------------------------------------------------------ around the step
    def setup(self, stage: str) -> None:
        if self.make_rollout_engine is not None and self.rollout_engine is None:
            self.rollout_engine = self.make_rollout_engine(local_rank=self.trainer.local_rank)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning then provides a device mesh), shard the policy and the EMA teacher
        alike, so the EMA update pairs each shard with its own; a no-op under any other strategy."""
        if self.device_mesh is None or fsdp_units(self.policy):
            return
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.policy, mesh, self.sharding)
        if self.distills and self.teacher is not None:
            shard_model(self.teacher, mesh, self.sharding)

    def transfer_batch_to_device(self, batch: list[MCQExample], device, dataloader_idx: int) -> list[MCQExample]:
        return batch  # plain examples; tokens are moved when they are made

    def _step_skipped(self) -> bool:
        """Whether this step made no optimizer update (non-finite loss here, or non-finite gradients)."""
        return self._loss_nonfinite or step_was_skipped(self._trainer)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA teacher's update: here rather than in ``on_train_batch_end``,
        which Lightning calls after the callbacks', so a checkpoint of this step already holds the update."""
        super().optimizer_step(*args, **kwargs)
        self._engine_is_stale = True
        if self.distills and self.teacher is not None and not self._step_skipped():
            ema_update(self.teacher, self.policy, self.ema_rate)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.log("perf/step_seconds", time.perf_counter() - self._step_started, on_step=True, batch_size=1)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.policy.parameters(),
            lr=self.optim.lr,
            weight_decay=self.optim.weight_decay,
            betas=tuple(self.optim.betas),
        )
        warmup = max(self.optim.warmup_steps, 0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """Advance the schedule only after a real update: a skipped step leaves the warm-up where it was."""
        if not self._step_skipped():
            super().lr_scheduler_step(scheduler, metric)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.distills:
            checkpoint["discrepancy_normalizer"] = self.normalizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.distills and "discrepancy_normalizer" in checkpoint:
            self.normalizer.load_state_dict(checkpoint["discrepancy_normalizer"])
