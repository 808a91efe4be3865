"""Where a training step's time goes: the seconds of each phase, logged as ``perf/<phase>_seconds``.

The phases of one step, in order (each logged only in the steps where it ran):

- ``rollout``: encode the prompts, sample the responses (with vLLM, after pushing the newest weights), score them;
- ``old_log_probs``: the policy's log-probabilities of its responses before the first of several updates (only in
  steps that make more than one, ``method.mini_batch_size``);
- ``student_forward``: the policy's hidden states on its own responses;
- ``teacher_forward``: the privileged contexts, their prompts and the teacher's hidden states (distillation only);
- ``loss``: the objective from the hidden states, in chunks of positions (it already back-propagates each chunk
  to the hidden states), and the step's diagnostics;
- ``backward``: from the hidden states through the policy;
- ``optimizer``: after the backward pass up to the updated weights (gradient clipping and checks, AdamW);
- ``ema``: the EMA teacher's update;
- ``checkpoint``: the checkpoint callback's work after the batch (saving a checkpoint on the steps that save one).

The forward, loss and backward phases add up over the step's micro-batches, the optimizer phase over its updates.

One clock, driven by the step itself: ``training_step`` times its phases and ends with :meth:`StepClock.lap`,
which returns the step's ``perf/*`` metrics (logged with the step's other metrics) and starts the next step. A step
therefore runs from the end of the previous ``training_step`` to the end of its own (the first from its own start),
less the time of any evaluation in between (``perf/eval_seconds``, logged with the evaluation's own metrics).
Lightning saves checkpoints after ``training_step`` has returned, so the ``checkpoint`` phase
(:class:`TimedModelCheckpoint`) falls in the following step and is logged with it; the checkpoint after the last
step is timed but never logged. (Logging it with its own step would take a hook that runs after Lightning's
checkpoint callbacks, which run after every other callback: only the module's own ``on_train_batch_end`` does.)
What the phases leave out of the step is Lightning's bookkeeping, the logging, the progress bar and the loading
of the batch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

PHASES = ("rollout", "old_log_probs", "student_forward", "teacher_forward", "loss", "backward", "optimizer", "ema", "checkpoint")


class StepClock:
    """The seconds of each phase of the current step, and of the step itself.

    ``device``: on CUDA, the device is synchronised at every phase's edges, so that a phase counts the work it
    launched rather than the launches.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.started: float | None = None  # no step started yet
        self.excluded = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start_step(self) -> None:
        """Forget the previous step's phases and start timing a new step."""
        self.seconds, self.excluded = {}, 0.0
        self.started = self._now()

    @contextmanager
    def phase(self, phase: str) -> Iterator[None]:
        """Time the block as ``phase`` (added to what that phase already took in this step)."""
        started = self._now()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + self._now() - started

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` spent on other work (an evaluation) out of the step's time."""
        self.excluded += seconds

    def step_seconds(self) -> float:
        """Seconds since :meth:`start_step`, less what was excluded."""
        return self._now() - self.started - self.excluded

    def metrics(self) -> dict[str, float]:
        """``perf/<phase>_seconds`` of every phase that ran, and ``perf/step_seconds``."""
        phases = {f"perf/{name}_seconds": seconds for name, seconds in self.seconds.items()}
        return {**phases, "perf/step_seconds": self.step_seconds()}

    def lap(self) -> dict[str, float]:
        """End the step: its :meth:`metrics`; the next step starts now."""
        metrics = self.metrics()
        self.start_step()
        return metrics


class TimedModelCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint`, its work after each batch timed as a ``checkpoint`` phase on the
    module's :class:`StepClock` (``pl_module.clock``; a module without one is not timed): Lightning runs it after
    ``training_step``, so the phase is logged with the following step.

    Under manual optimization Lightning warns at every save that the checkpoint holds the weights after the
    step's updates: what a checkpoint of a finished step is meant to hold, so the warning is silenced."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        clock = getattr(pl_module, "clock", None)
        with clock.phase("checkpoint") if isinstance(clock, StepClock) else nullcontext(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
