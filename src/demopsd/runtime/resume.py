"""Continuing a run after a crash: which checkpoint, and the state Lightning does not keep by itself.

Lightning's checkpoint already holds the weights (the EMA teacher is a submodule of the module, so it is
among them), the optimizer, the learning-rate schedule, the loop counters and every callback's state;
:class:`demopsd.runtime.checkpoints.AtomicCheckpointIO` writes each file whole or not at all.
:class:`RunStateCheckpoint` adds the random states of every library, the
W&B run id and how many lines of ``metrics.csv`` the checkpoint covers. The data position needs nothing
stored: the batch of every training step is a function of the seed and the step
(:class:`demopsd.data.datamodule.StepIndexedBatches`).

``ckpt_path`` (the config key) accepts a ``.ckpt`` file, a run directory (its newest checkpoint) or ``last``:
the newest run directory of the same ``task_name`` and ``run_name`` that has a checkpoint. "Newest checkpoint"
is by modification time, not ``last.ckpt``: Lightning replaces that link by deleting it first, so a kill can
leave a run without one. A resumed
run writes into the run directory of its checkpoint, so ``metrics.csv``, the checkpoints and the W&B run
continue where they stopped.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from demopsd.runtime.checkpoints import CHECKPOINT_DIR, is_checkpoint, newest_checkpoint, trainer_state_file

log = logging.getLogger(__name__)

LAST = "last"


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint file to continue from and the run directory it belongs to."""

    checkpoint: Path
    run_dir: Path


def resolve_checkpoint(ckpt_path: str | Path, runs_dir: str | Path, run_name: str) -> ResumePoint:
    """The checkpoint ``ckpt_path`` names (see the module docstring), or FileNotFoundError saying what was tried.

    ``runs_dir`` holds the run directories (named ``<timestamp>_<run_name>``) searched for ``last``.
    """
    if str(ckpt_path) == LAST:
        runs = [d for d in sorted(Path(runs_dir).glob(f"*_{run_name}")) if newest_checkpoint(d) is not None]
        if not runs:
            raise FileNotFoundError(
                f"ckpt_path=last found no run to continue: no {runs_dir}/*_{run_name}/checkpoints/*.ckpt "
                "(a run directory or a .ckpt file is accepted too)"
            )
        checkpoint = newest_checkpoint(runs[-1])  # the timestamp prefix sorts the newest run last
    else:
        path = Path(ckpt_path)
        checkpoint = path if is_checkpoint(path) or not path.is_dir() else newest_checkpoint(path)
        if checkpoint is None or not is_checkpoint(checkpoint):
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} is not a checkpoint: "
                f"{'no checkpoints/*.ckpt in it' if path.is_dir() else 'no such file'} "
                "(a .ckpt file or sharded .ckpt directory, a run directory with checkpoints/*.ckpt, or `last` "
                "is accepted)"
            )
    checkpoint = checkpoint.resolve()
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint.parent
    return ResumePoint(checkpoint, run_dir)


def read_run_state(checkpoint: Path) -> dict:
    """The :class:`RunStateCheckpoint` entry of ``checkpoint`` (empty if it has none), without reading the
    weights into memory (the file is memory-mapped)."""
    state = torch.load(trainer_state_file(checkpoint), map_location="cpu", mmap=True, weights_only=False)
    return state.get("callbacks", {}).get(RunStateCheckpoint.__qualname__, {})


def kept_metrics_lines(metrics_csv: Path, lines: int | None, global_step: int | None) -> list[str]:
    """The lines of ``metrics_csv`` a run resumed at ``global_step`` keeps: the first ``lines`` (written before
    the checkpoint), then the rows of earlier steps logged after it (Lightning logs a step's training metrics
    after the checkpoint of that step is written). Rows of later steps are logged again by the resumed run,
    and would otherwise appear twice. ``lines`` None (a checkpoint that does not say): keep every line."""
    if not metrics_csv.is_file():
        return []
    with metrics_csv.open() as file:
        all_lines = list(file)
    if lines is None or global_step is None:
        return all_lines
    step = next(csv.reader(all_lines[:1])).index("step")
    later = [line for line in all_lines[lines:] if int(next(csv.reader([line]))[step]) < global_step]
    return all_lines[:lines] + later


@rank_zero_only
def continue_csv_log(logger: CSVLogger, kept_lines: list[str]) -> None:
    """Make ``logger`` append to ``kept_lines``: Lightning's CSV writer deletes an existing ``metrics.csv``
    when it starts, so the kept rows are written back and their header becomes the writer's. Only the first
    process writes ``metrics.csv``; the others' loggers are placeholders."""
    writer = logger.experiment
    if kept_lines:
        Path(writer.metrics_file_path).write_text("".join(kept_lines))
        writer.metrics_keys = next(csv.reader(kept_lines[:1]))


class RunStateCheckpoint(L.Callback):
    """Saves random states, the W&B run id and the ``metrics.csv`` length with every checkpoint.

    The random states of every process are saved (gathered into the first process's checkpoint) and each
    process gets its own back when training starts again, after everything that set-up draws, so the steps
    after a resume sample the same rollouts as an uninterrupted run.
    """

    def __init__(self, metrics_csv: Path | None = None) -> None:
        self.metrics_csv = metrics_csv
        self._rng_to_restore: list[dict] | None = None  # one state per process of the checkpointed run

    def state_dict(self) -> dict:
        trainer = self._trainer
        for logger in trainer.loggers:
            logger.save()  # so that the line count covers every row logged so far
        lines = None
        if self.metrics_csv is not None and self.metrics_csv.is_file():
            with self.metrics_csv.open() as file:
                lines = sum(1 for _ in file)
        return {
            "rng_per_process": states_of_every_process(plain_rng_states()),  # collective: every process is here
            "wandb_run_id": wandb_run_id(trainer),
            "metrics_csv_lines": lines,
            "global_step": trainer.global_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # "rng": the first process's state alone, in checkpoints written before the per-process states
        states = state_dict.get("rng_per_process") or ([state_dict["rng"]] if state_dict.get("rng") else None)
        self._rng_to_restore = None if states is None else [numpy_key_as_array(state) for state in states]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._rng_to_restore is None:
            return
        states, self._rng_to_restore = self._rng_to_restore, None
        if len(states) != trainer.world_size:
            log.warning(
                "The checkpoint holds the random states of %d process(es) and this run has %d: every process "
                "continues from the first one's, so the rollouts differ from those of an uninterrupted run",
                len(states), trainer.world_size,
            )
            states = states[:1] * trainer.world_size
        _set_rng_states(states[trainer.global_rank])


def states_of_every_process(state: dict) -> list[dict]:
    """``state`` of each process of the run, in rank order (just ``[state]`` in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [state]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def numpy_key_as_array(state: dict) -> dict:
    """The inverse of :func:`plain_rng_states`'s conversion of numpy's key."""
    kind, key, *rest = state["numpy"]
    return {**state, "numpy": (kind, np.asarray(key, dtype=np.uint32), *rest)}


def plain_rng_states() -> dict:
    """Lightning's random states of torch, numpy and Python, with numpy's key as a list: a checkpoint then
    holds no numpy arrays and loads with ``torch.load(weights_only=True)``."""
    states = _collect_rng_states()
    numpy_state = states["numpy"]
    states["numpy"] = (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:])
    return states


def wandb_run_id(trainer: L.Trainer) -> str | None:
    """The id of the W&B run among ``trainer``'s loggers, if one is running."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None
