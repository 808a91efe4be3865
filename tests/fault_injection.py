"""Runs ``src/train.py`` with a fault injected: ``python tests/fault_injection.py FAULT hydra-overrides...``.

FAULT is ``kill-at-step:S`` (SIGKILL when the optimizer step counter reaches S, before that step's batch is
trained) or ``kill-writing:NAME`` (SIGKILL half-way through writing the checkpoint file called NAME).
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(step: int) -> None:
    from demopsd.module import SelfDistillationModule

    train = SelfDistillationModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == step:
            kill()
        return train(self, batch, batch_idx)

    SelfDistillationModule.training_step = training_step


def kill_writing(name: str) -> None:
    save = torch.save

    def half_save(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith(f"{name}.partial"):
            f.write(b"\0" * 4096)  # the start of a file that never gets finished
            f.flush()
            kill()
        return save(obj, f, *args, **kwargs)

    torch.save = half_save


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    kind, _, arg = fault.partition(":")
    {"kill-at-step": lambda: kill_at_step(int(arg)), "kill-writing": lambda: kill_writing(arg)}[kind]()
    sys.argv = [str(REPO_ROOT / "src" / "train.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")
