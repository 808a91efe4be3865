"""Checkpoint files that are either complete or absent, whatever kills the process and wherever /tmp is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"


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
