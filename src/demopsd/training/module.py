"""The LightningModule: Lightning's hooks around one training step, whatever the method.

prompts → scored rollouts (:func:`demopsd.rollout.scored.scored_rollouts`) → the method's step
(:mod:`demopsd.training.steps`: contexts, teacher and student states, objective) → one optimizer update per
mini-batch, each accumulating the gradients of its micro-batches (:mod:`demopsd.training.batching`) → the step's
after-update work (EMA teacher), if the numerical guard let one of the updates through.

The module drives its optimizer itself (Lightning's manual optimization), as the reference's actor does:
``trainer.global_step`` counts training steps (batches of prompts), whatever the number of updates in each.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.batching import MemoryConfig
from demopsd.config.settings import OptimConfig, PromptConfig, SamplingConfig, ShardingConfig
from demopsd.data.types import MCQExample
from demopsd.rollout.batch import RolloutBatch
from demopsd.rollout.engine import GenerateEngine, RolloutEngine
from demopsd.rollout.scored import scored_rollouts
from demopsd.runtime.models import awaits_rank0_weights
from demopsd.runtime.sharding import fsdp_units, gathered, shard_from_rank0, shard_model
from demopsd.training.batching import micro_batches, mini_batches
from demopsd.training.guards import step_was_skipped
from demopsd.training.steps import MethodStep, StepBatch, recorded_log_probs
from demopsd.training.teacher import fill_ema_teacher
from demopsd.training.timing import StepClock


class SelfDistillationModule(L.LightningModule):
    """Trains ``policy`` on-policy with ``step``, a :class:`demopsd.training.steps.MethodStep` (distillation or
    GRPO) built around the same ``policy``.

    The step's ``teacher`` (an EMA copy, or None) is a submodule here, so checkpoints hold it beside the policy.
    ``make_rollout_engine``: builds, given the process's ``local_rank``, the engine that samples the rollouts; it
    is called in :meth:`setup`, once the training processes are connected (default: ``generate`` on the policy).
    ``updates_per_batch``: optimizer updates per training step, each on an equal share of the step's prompts (a
    mini-batch); the log-probabilities the updates' ratios start from are recorded before the first.
    ``memory``: the token budget of the micro-batches a mini-batch is run in.
    ``sharding``: how :meth:`configure_model` shards the policy and the teacher under ``trainer=fsdp``.
    ``clock`` times each step and its phases (:mod:`demopsd.training.timing`), logged as ``perf/*_seconds``.
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
        updates_per_batch: int = 1,
        memory: MemoryConfig | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
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
        self.updates_per_batch = updates_per_batch
        self.memory = memory or MemoryConfig()
        self.clock = StepClock()

    # ------------------------------------------------------------------ training step
    def training_step(self, batch: list[MCQExample], batch_idx: int) -> None:
        """Sample and score the batch's rollouts, then one update per mini-batch (each skipped by the numerical
        guard when its loss or gradients are not finite), the learning-rate schedule and the EMA teacher once."""
        if self.clock.started is None:  # the run's first step; each later one starts where the one before ended
            self.clock.start_step()
        engine = self.rollout_engine
        with self.clock.phase("rollout"), gathered(self.policy) if engine.uses_policy_weights else nullcontext():
            rollouts, examples, scores = scored_rollouts(engine, self.tokenizer, batch, self.sampling, self.prompts)
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=self.device)
        metrics = {
            "train/reward_mean": rewards.mean(),
            "train/accuracy": torch.tensor([s.correct for s in scores], dtype=torch.float32).mean(),
            "train/format_rate": torch.tensor([s.well_formed for s in scores], dtype=torch.float32).mean(),
            "train/response_length": rollouts.response_mask.sum(-1).float().mean(),
            "perf/rollout_tokens_per_s": torch.tensor(rollouts.num_tokens / max(rollouts.seconds, 1e-9)),
        }
        updates = mini_batches(len(examples), rollouts.group_size, self.updates_per_batch)
        step_batch = StepBatch(rollouts, examples, scores, self.global_step)
        if len(updates) > 1:
            with self.clock.phase("old_log_probs"):
                step_batch.old_log_probs = recorded_log_probs(
                    self.policy, rollouts, self.micro_batches(rollouts, range(len(examples))),
                    self.sampling.temperature,
                )
        self.method_step.begin(step_batch)
        optimizer = self.optimizers()
        grad_norms, update_norms = [], []
        for index, mini_batch in enumerate(updates):
            optimizer.zero_grad(set_to_none=True)
            for micro_batch in self.micro_batches(rollouts, mini_batch):
                loss = self.method_step.micro_batch_loss(mini_batch, micro_batch, self.clock)
                with self.clock.phase("backward"):
                    self.manual_backward(loss)
            with self.clock.phase("optimizer"):
                grad_norms.append(self.clip_gradient_norm())
                before = [p.detach().clone() for p in self.policy.parameters()] if self.optim.log_update_norm else None
                self.update(optimizer, counts_as_step=index == len(updates) - 1)
                if before is not None:
                    update_norms.append(self.change_norm(before))
        optimizer.zero_grad(set_to_none=True)
        metrics.update(self.method_step.end())
        metrics["train/grad_norm"] = torch.stack(grad_norms).mean()
        if update_norms:
            metrics["train/update_norm"] = torch.stack(update_norms).mean()
        if not step_was_skipped(self._trainer):
            self.after_updates()
        distributed = self._trainer is not None and self.trainer.world_size > 1
        self.log_dict(  # under DDP each metric is the mean over the ranks
            {k: v.float() for k, v in metrics.items()}, on_step=True, batch_size=len(examples), sync_dist=distributed
        )
        self.log("reward", metrics["train/reward_mean"].float(), prog_bar=True, logger=False, batch_size=len(examples))
        for name, key in self.method_step.progress_bar.items():
            self.log(name, metrics[key].float(), prog_bar=True, logger=False, batch_size=len(examples))
        self.log_dict(self.clock.lap(), on_step=True, batch_size=1)

    def micro_batches(self, rollouts: RolloutBatch, rows: range) -> list[range]:
        """``rows`` of ``rollouts`` cut to ``memory.micro_batch_tokens`` padded tokens per forward."""
        return micro_batches(rows, rollouts.prompt.mask.sum(-1), rollouts.response_mask.sum(-1),
                             self.memory.micro_batch_tokens)

    def clip_gradient_norm(self) -> torch.Tensor:
        """The global norm of the policy's gradients, which are scaled down to ``optim.grad_clip`` when it is
        larger; non-finite gradients are left alone for the numerical guard to name and skip."""
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # sharded gradients: the norm over every process's shards
            norm = norm.full_tensor()
        if self.optim.grad_clip is not None and torch.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(self.policy.parameters(), self.optim.grad_clip, norm)
        return norm.detach().float().cpu()

    def change_norm(self, before: list[torch.Tensor]) -> torch.Tensor:
        """The global norm of the policy's parameters minus ``before`` (their values before an update): the size
        of the step the optimizer took (0 for a skipped update); over every process's shards when sharded."""
        norm = torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(self.policy.parameters(), before)])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return norm.float().cpu()

    def update(self, optimizer, *, counts_as_step: bool) -> None:
        """One optimizer update through Lightning (callbacks' ``on_before_optimizer_step``, hence the numerical
        guard, see it); only the step's last update counts toward ``trainer.global_step``."""
        if counts_as_step:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def after_updates(self) -> None:
        """After a step that changed the policy: the learning-rate schedule, the engine's copy of the weights
        and the method's after-update work (the EMA teacher). A step whose every update was skipped leaves the
        warm-up and the teacher where they were."""
        self.lr_schedulers().step()
        self.rollout_engine.policy_updated()
        with self.clock.phase("ema"):
            self.method_step.after_optimizer_step()

    # ------------------------------------------------------------------ around the step
    def setup(self, stage: str) -> None:
        if self.rollout_engine is None:
            self.rollout_engine = self.make_rollout_engine(local_rank=self.trainer.local_rank)
        self.clock = StepClock(self.device)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning then provides a device mesh), shard the policy and the EMA teacher
        alike, so the EMA update pairs each shard with its own; a no-op under any other strategy.

        A policy loaded with ``sharded=True`` (:func:`demopsd.runtime.models.load_model_and_tokenizer`: the weights
        on global rank 0 only, the meta device elsewhere) is sharded empty and its shards are filled from rank 0's
        (:func:`demopsd.runtime.sharding.shard_from_rank0`); its teacher, built empty beside it, is filled from the
        policy's shards (:func:`demopsd.training.teacher.fill_ema_teacher`)."""
        from_rank0 = awaits_rank0_weights(self.policy)
        if self.device_mesh is None and from_rank0:
            raise RuntimeError(
                "the policy was loaded with sharded=True (its weights on global rank 0 only), but the strategy shards "
                "nothing: train it with trainer=fsdp, or load it with sharded=False"
            )
        if self.device_mesh is None or fsdp_units(self.policy):
            return
        mesh = self.device_mesh["data_parallel"]
        if from_rank0:
            shard_from_rank0(self.policy, mesh, self.sharding)
        else:
            shard_model(self.policy, mesh, self.sharding)
        if self.teacher is not None:
            shard_model(self.teacher, mesh, self.sharding)
            if from_rank0:  # make_ema_teacher built it empty
                fill_ema_teacher(self.teacher, self.policy)

    def transfer_batch_to_device(self, batch: list[MCQExample], device, dataloader_idx: int) -> list[MCQExample]:
        return batch  # plain examples; tokens are moved when they are made

    def configure_optimizers(self):
        optim = self.optim
        if optim.name == "sgd":
            optimizer = torch.optim.SGD(self.policy.parameters(), lr=optim.lr, momentum=optim.momentum,
                                        weight_decay=optim.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.policy.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                                          betas=tuple(optim.betas))
        warmup = self.optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, step / warmup) if warmup else 1.0  # the reference's: 0 at the first step
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(self.method_step.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.method_step.load_state_dict(checkpoint)
