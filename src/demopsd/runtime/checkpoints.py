"""The layout of a run's checkpoints, in one place, and checkpoint files that are either complete or absent.

A training run directory holds ``checkpoints/step<NNNNNN>.ckpt`` (Lightning checkpoints; under ``trainer=fsdp``
directories of weight shards with a trainer-state file), ``checkpoints/last.ckpt`` linking the newest, and, with
``checkpoint.save_final_model``, ``model/`` (a Hugging Face model directory). In a checkpoint's ``state_dict`` the
policy's weights are under :data:`POLICY_PREFIX` (the LightningModule's ``policy`` attribute) and the EMA
teacher's under ``teacher.``. Training, resume and evaluation all read the layout from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

PARTIAL_SUFFIX = ".partial"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FINAL_MODEL_DIR = "model"
POLICY_PREFIX = "policy."
SHARDED_TRAINER_STATE = _METADATA_FILENAME  # "meta.pt", beside the shards of a sharded checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a hidden ``.<name>.partial`` file beside its destination, syncs it to disk and
    renames it into place, so a kill mid-write leaves the previous checkpoints as they were.

    Lightning's own writer first serialises the whole checkpoint into memory and stages it in the system
    temporary directory, whose move onto another file system (a shared disk) is a copy that a kill can cut
    short. Writing in the destination directory makes the final rename atomic, and streaming to the file
    saves the in-memory copy. Remote URLs (``s3://`` ...) are left to Lightning.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        with partial.open("wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)


def partial_path(path: Path) -> Path:
    """Where :class:`AtomicCheckpointIO` writes ``path`` before renaming it."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written complete checkpoint in ``run_dir/checkpoints``, or None."""
    found = [p.resolve() for p in (run_dir / CHECKPOINT_DIR).glob("*.ckpt") if is_checkpoint(p.resolve())]
    return max(found, key=lambda p: trainer_state_file(p).stat().st_mtime_ns, default=None)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a complete sharded checkpoint (``trainer=fsdp``): a directory of weight shards
    whose trainer-state file, written after every shard, exists."""
    return trainer_state_file(path).is_file()


def trainer_state_file(checkpoint: Path) -> Path:
    """The file holding the loop counters, callback states ...: the checkpoint itself, or, in a sharded one,
    the file Lightning writes beside the shards."""
    return checkpoint / SHARDED_TRAINER_STATE if checkpoint.is_dir() else checkpoint


def load_policy_weights(model: nn.Module, checkpoint: Path) -> None:
    """Put the policy weights of a training checkpoint (a file, or a sharded directory) into ``model``."""
    if checkpoint.is_dir():  # one process reads every shard
        state = {"state_dict": {f"{POLICY_PREFIX}{name}": tensor for name, tensor in model.state_dict().items()}}
        torch.distributed.checkpoint.load(state, checkpoint_id=checkpoint)
        return
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix(POLICY_PREFIX): v for k, v in state.items() if k.startswith(POLICY_PREFIX)})
