"""Numerical guards: a non-finite loss or gradient never reaches the weights, and collapse is flagged.

:class:`NumericalGuard` is a Lightning callback (the ``guards`` settings). Each optimizer step it
checks, after backward and before gradient clipping and the optimizer step:

* the loss: non-finite when ``training_step`` returned ``None`` (Lightning then skips backward) or when a loss
  handed to backward is NaN/inf (:class:`SelfDistillationModule` back-propagates one per micro-batch, all
  checked);
* every gradient of the optimizer's parameters.

Under manual optimization (:class:`SelfDistillationModule` makes one update per mini-batch) each update is
checked and skipped alone.

On trouble it *skips the update*: it sets every gradient to ``None``, so the optimizer (AdamW, SGD, ...)
touches neither the weights nor its state. The guard alone knows whether the current training step changed the
policy: the module asks :func:`step_was_skipped` after the step's updates, and moves its EMA teacher and
learning-rate schedule only when one of them was not skipped. Skips are counted (``train/skipped_steps``,
cumulative, logged every step) and warned about, naming the loss or the first parameters with non-finite
gradients. After ``max_consecutive_skips`` skipped updates in a row the run stops with
:class:`NonFiniteTrainingError`.

Lightning's ``trainer.global_step`` still advances on a skipped step, so skipped steps count toward
``trainer.max_steps``.

:class:`CollapseTracker` warns when ``train/entropy`` or ``train/response_length`` falls below a ratio of
its mean over the first few steps (entropy or length collapse); the guard logs ``guards/<kind>_collapse``.
Under fp16 mixed precision the gradient scaler's overflow steps would count as skips too (this project
trains in fp32 or bf16, where any non-finite gradient is a real problem).
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

from demopsd.config.sections import GuardConfig
from demopsd.runtime.loggers import alert

log = logging.getLogger(__name__)

MAX_NAMES_SHOWN = 5  # parameters named in a warning about non-finite gradients
COLLAPSE_METRICS = {"entropy": "train/entropy", "length": "train/response_length"}


class NonFiniteTrainingError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient: the run is not recovering."""


class CollapseTracker:
    """Flags a metric that falls below ``ratio`` × its mean over the first ``warmup_steps`` finite values.

    ``update(value)`` returns whether the metric is collapsed now; it logs a warning when a collapse
    starts, and again only after the metric has recovered (risen back to the threshold) and fallen again.
    Non-finite values are ignored. ``ratio = 0`` never flags.
    """

    def __init__(self, name: str, ratio: float, warmup_steps: int) -> None:
        self.name, self.ratio, self.warmup_steps = name, ratio, warmup_steps
        self.seen = 0  # finite values used for the reference mean
        self.reference = 0.0  # running mean of the first `warmup_steps` values
        self.collapsed = False

    def update(self, value: float) -> bool:
        value = float(value)
        if not math.isfinite(value):
            return self.collapsed
        if self.seen < self.warmup_steps:
            self.seen += 1
            self.reference += (value - self.reference) / self.seen
            return False
        threshold = self.ratio * self.reference
        if value < threshold and not self.collapsed:
            log.warning(self.message(value))
        self.collapsed = value < threshold
        return self.collapsed

    def message(self, value: float) -> str:
        return (f"{self.name.capitalize()} collapse: {COLLAPSE_METRICS.get(self.name, self.name)}={value:.4g} is below "
                f"{self.ratio:.2g} × its mean over the first {self.warmup_steps} steps ({self.reference:.4g})")

    def state_dict(self) -> dict:
        return {"seen": self.seen, "reference": self.reference, "collapsed": self.collapsed}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.reference, self.collapsed = state["seen"], state["reference"], state["collapsed"]


class NumericalGuard(Callback):
    """Skips updates with a non-finite loss or gradient; stops after ``max_consecutive_skips`` in a row.

    Also tracks entropy and response-length collapse (see :class:`CollapseTracker`), as ``config`` (the
    ``guards`` settings, checked with the config) says.
    """

    def __init__(self, config: GuardConfig = GuardConfig()) -> None:
        self.max_consecutive_skips = config.max_consecutive_skips
        self.trackers = {
            "entropy": CollapseTracker("entropy", config.entropy_collapse_ratio, config.warmup_steps),
            "length": CollapseTracker("length", config.length_collapse_ratio, config.warmup_steps),
        }
        self.skipped_steps = 0  # cumulative
        self.consecutive_skips = 0
        self.first_skipped_step = 0  # the training step of the first update of the current run of skips
        self.step_updates: list[bool] = []  # whether each update of the current training step was skipped
        self._loss_finite: bool | None = None  # None: no backward this batch (training_step returned None)

    # ------------------------------------------------------------------ the step
    @property
    def step_skipped(self) -> bool:
        """Every update of the current training step was skipped: the step left the policy as it was."""
        return bool(self.step_updates) and all(self.step_updates)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.step_updates = []
        self._loss_finite = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Every loss back-propagated into the coming update (one per micro-batch) must be finite."""
        self._loss_finite = self._loss_finite is not False and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        try:
            self._check_update(trainer, pl_module, optimizer)
        finally:
            self._loss_finite = None  # the next update's losses are checked afresh

    def _check_update(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._loss_finite is None:
            problem = "the loss was non-finite (training_step returned None)"
        elif not self._loss_finite:
            problem = "the loss was non-finite"
        else:
            bad = nonfinite_gradients(pl_module, params)
            if not bad:
                self.consecutive_skips = 0
                self.step_updates.append(False)
                return
            more = len(bad) - MAX_NAMES_SHOWN
            shown = ", ".join(bad[:MAX_NAMES_SHOWN]) + (f" (+{more} more)" if more > 0 else "")
            problem = f"non-finite gradients in {len(bad)} parameter(s): {shown}"
        for p in params:
            p.grad = None  # the optimizer skips parameters without a gradient: no update, no state change
        self.step_updates.append(True)
        self.skipped_steps += 1
        if self.consecutive_skips == 0:
            self.first_skipped_step = trainer.global_step
        self.consecutive_skips += 1
        log.warning(
            "Skipped an update at step %d: %s; weights, optimizer state and EMA teacher left as they were "
            "(%d skipped in a row, %d in all)",
            trainer.global_step, problem, self.consecutive_skips, self.skipped_steps,
        )
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteTrainingError(self._stop_message(trainer, problem))

    def _stop_message(self, trainer: L.Trainer, problem: str) -> str:
        first = self.first_skipped_step
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") if trainer.checkpoint_callback else ""
        where = (
            f"The last good checkpoint is {checkpoint}: its weights are from before the trouble (skipped steps never "
            "changed them); resume from it with ckpt_path=..., e.g. with a lower optim.lr."
            if checkpoint
            else "No checkpoint has been written yet (checkpoints/last.ckpt appears after "
            "checkpoint.every_n_train_steps steps); no non-finite update ever reached the weights."
        )
        return (
            f"Training stopped: {self.consecutive_skips} updates in a row "
            f"(steps {first}-{trainer.global_step}) were skipped for a non-finite loss or gradient "
            f"(guards.max_consecutive_skips={self.max_consecutive_skips}); the last one: {problem}. {where}"
        )

    # ------------------------------------------------------------------ logging and collapse
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        metrics = {"train/skipped_steps": float(self.skipped_steps)}
        for kind, tracker in self.trackers.items():
            value = trainer.callback_metrics.get(COLLAPSE_METRICS[kind])
            if value is not None:
                was_collapsed = tracker.collapsed
                metrics[f"guards/{kind}_collapse"] = float(tracker.update(float(value)))
                if tracker.collapsed and not was_collapsed and trainer.is_global_zero:
                    alert(trainer.loggers, f"{kind} collapse", tracker.message(float(value)))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "first_skipped_step": self.first_skipped_step,
            "trackers": {kind: t.state_dict() for kind, t in self.trackers.items()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = state_dict["skipped_steps"]
        self.consecutive_skips = state_dict["consecutive_skips"]
        self.first_skipped_step = state_dict.get("first_skipped_step", 0)
        for kind, state in state_dict.get("trackers", {}).items():
            self.trackers[kind].load_state_dict(state)


def nonfinite_gradients(module: torch.nn.Module, params: list[torch.Tensor]) -> list[str]:
    """Names of the parameters in ``params`` whose gradient holds a NaN or an infinity (one host sync).

    Sharded gradients (``trainer=fsdp``) are checked shard by shard and the verdicts combined across the
    processes, so that every process skips the same steps."""
    with_grad = [p for p in params if p.grad is not None and p.grad.numel() > 0]
    if not with_grad:
        return []
    # The max-abs norm is NaN/inf exactly when the gradient has a NaN/inf, without a full-size temporary.
    grads = [p.grad.detach() for p in with_grad]
    shards = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = shards[0].device
    norms = [torch.linalg.vector_norm(g, float("inf")).float().to(device) if g.numel() else torch.zeros((), device=device)
             for g in shards]  # a process's shard of a small tensor can be empty
    nonfinite = (~torch.isfinite(torch.stack(norms))).float()
    sharded = next((g for g in grads if isinstance(g, DTensor)), None)
    if sharded is not None:
        torch.distributed.all_reduce(nonfinite, torch.distributed.ReduceOp.MAX, group=sharded.device_mesh.get_group())
    finite = (nonfinite == 0).tolist()
    names = {id(p): name for name, p in module.named_parameters()}
    return [names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p, ok in zip(with_grad, finite) if not ok]


def step_was_skipped(trainer: L.Trainer | None) -> bool:
    """Whether a :class:`NumericalGuard` among ``trainer``'s callbacks skipped every update of the current training
    step (never without one)."""
    callbacks = getattr(trainer, "callbacks", None) or []
    return any(isinstance(cb, NumericalGuard) and cb.step_skipped for cb in callbacks)
