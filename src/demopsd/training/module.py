"""The LightningModule: Lightning's hooks around one training step, whatever the method.

prompts → rollouts (the rollout engine) → rewards → the method's step (:mod:`demopsd.training.steps`: contexts,
teacher and student states, objective) → optimizer step (Lightning) → the step's after-update work (EMA teacher).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import OptimConfig, PromptConfig, SamplingConfig, ShardingConfig
from demopsd.data.rewards import MCQScore, score_mcq
from demopsd.data.types import MCQExample, student_conversation
from demopsd.rollout.batch import RolloutBatch, encode_prompts
from demopsd.rollout.engine import GenerateEngine, RolloutEngine
from demopsd.runtime.sharding import fsdp_units, gathered, shard_model
from demopsd.training.guards import step_was_skipped
from demopsd.training.steps import MethodStep
from demopsd.training.timing import StepClock


class SelfDistillationModule(L.LightningModule):
    """Trains ``policy`` on-policy with ``step``, a :class:`demopsd.training.steps.MethodStep` (distillation or
    GRPO) built around the same ``policy``.

    The step's ``teacher`` (an EMA copy, or None) is a submodule here, so checkpoints hold it beside the policy.
    ``make_rollout_engine``: builds, given the process's ``local_rank``, the engine that samples the rollouts; it
    is called in :meth:`setup`, once the training processes are connected (default: ``generate`` on the policy).
    ``sharding``: how :meth:`configure_model` shards the policy and the teacher under ``trainer=fsdp``.
    ``clock`` times the phases of each step (:mod:`demopsd.training.timing`), logged as ``perf/*_seconds``.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        step: MethodStep,
        sampling: SamplingConfig,
        *,
        optim: OptimConfig | None = None,
        prompts: PromptConfig | None = None,
        make_rollout_engine: Callable[..., RolloutEngine] | None = None,
        sharding: ShardingConfig | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy.train()  # from_pretrained returns eval mode; rollouts switch to eval themselves
        self.tokenizer = tokenizer
        self.method_step = step
        self.teacher = step.teacher
        self.sampling = sampling
        self.optim = optim or OptimConfig()
        self.prompts = prompts or PromptConfig()
        self.make_rollout_engine = make_rollout_engine or (lambda local_rank=0: GenerateEngine(policy, tokenizer))
        self.rollout_engine: RolloutEngine | None = None
        self.sharding = sharding or ShardingConfig()
        self.clock = StepClock()
        self._loss_nonfinite = False  # this step's loss was NaN/inf: no optimizer, EMA or scheduler step

    # ------------------------------------------------------------------ training step
    def training_step(self, batch: list[MCQExample], batch_idx: int) -> torch.Tensor | None:
        """The loss of one batch; ``None`` (Lightning skips backward and the update) when it is not finite."""
        self._loss_nonfinite = False
        with self.clock.phase("rollout"):
            rollouts, examples, scores = self.scored_rollouts(batch)
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device)

        metrics = {
            "train/reward_mean": rewards.mean(),
            "train/accuracy": torch.tensor([s.correct for s in scores], dtype=torch.float32).mean(),
            "train/format_rate": torch.tensor([s.well_formed for s in scores], dtype=torch.float32).mean(),
            "train/response_length": rollouts.response_mask.sum(-1).float().mean(),
            "perf/rollout_tokens_per_s": torch.tensor(rollouts.num_tokens / max(rollouts.seconds, 1e-9)),
        }
        loss, step_metrics = self.method_step(rollouts, examples, scores, self.global_step, self.clock)
        metrics.update(step_metrics)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        self.log_dict(  # under DDP each metric is the mean over the ranks
            {k: v.float() for k, v in metrics.items()}, on_step=True, batch_size=len(examples), sync_dist=distributed
        )
        self.log("reward", metrics["train/reward_mean"].float(), prog_bar=True, logger=False, batch_size=len(examples))
        for name, key in self.method_step.progress_bar.items():
            self.log(name, metrics[key].float(), prog_bar=True, logger=False, batch_size=len(examples))
        if not torch.isfinite(loss.detach()):
            self._loss_nonfinite = True  # counted and warned about by guards.NumericalGuard
            # Under DDP every rank must take part in the gradient all-reduce: the non-finite gradients
            # then reach every rank, and the guard skips the step everywhere.
            return loss if distributed else None
        return loss

    def scored_rollouts(self, batch: list[MCQExample]) -> tuple[RolloutBatch, list[MCQExample], list[MCQScore]]:
        """``sampling.n`` rollouts per question of ``batch`` from the rollout engine, the question each row answers,
        and each row's score."""
        prompts = encode_prompts(
            self.tokenizer,
            [student_conversation(e) for e in batch],
            max_tokens=self.prompts.max_prompt_tokens,
            chat_template_kwargs=self.prompts.chat_template_kwargs,
        )
        engine = self.rollout_engine
        with gathered(self.policy) if engine.uses_policy_weights else nullcontext():
            rollouts = engine.generate(prompts, self.sampling)
        examples = [e for e in batch for _ in range(self.sampling.n)]
        scores = [score_mcq(text, e.answer, e.letters, e.reward_rule) for text, e in zip(rollouts.texts, examples)]
        return rollouts, examples, scores

    # ------------------------------------------------------------------ around the step
    def setup(self, stage: str) -> None:
        if self.rollout_engine is None:
            self.rollout_engine = self.make_rollout_engine(local_rank=self.trainer.local_rank)
        self.clock = StepClock(self.device)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning then provides a device mesh), shard the policy and the EMA teacher
        alike, so the EMA update pairs each shard with its own; a no-op under any other strategy."""
        if self.device_mesh is None or fsdp_units(self.policy):
            return
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.policy, mesh, self.sharding)
        if self.teacher is not None:
            shard_model(self.teacher, mesh, self.sharding)

    def transfer_batch_to_device(self, batch: list[MCQExample], device, dataloader_idx: int) -> list[MCQExample]:
        return batch  # plain examples; tokens are moved when they are made

    def _step_skipped(self) -> bool:
        """Whether this step made no optimizer update (non-finite loss here, or non-finite gradients)."""
        return self._loss_nonfinite or step_was_skipped(self._trainer)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the method's after-update work (the EMA teacher's update): here rather than in
        ``on_train_batch_end``, which Lightning calls after the callbacks', so a checkpoint of this step already
        holds the update."""
        super().optimizer_step(*args, **kwargs)
        self.clock.end("optimizer")
        self.rollout_engine.policy_updated()
        if not self._step_skipped():
            with self.clock.phase("ema"):
                self.method_step.after_optimizer_step()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.clock.start_step()

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.clock.begin("backward")

    def on_after_backward(self) -> None:
        self.clock.end("backward")
        self.clock.begin("optimizer")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """Log the step's timings; the checkpoint callback, which Lightning runs last, has run by now."""
        self.log_dict(self.clock.metrics(), on_step=True, batch_size=1)

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
        checkpoint.update(self.method_step.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.method_step.load_state_dict(checkpoint)
