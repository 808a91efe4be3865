"""``src/train.py`` with a test hook, named by the environment variable ``DEMOPSD_TEST_HOOK``:

``kill-at-step:S``      SIGKILL when the optimizer step counter reaches S, before that step's batch is trained;
``kill-writing:NAME``   SIGKILL half-way through writing the checkpoint file called NAME;
``record:DIR``          each process writes ``DIR/rank<r>.jsonl`` (its prompts and metrics of every step, before
                        they are reduced across processes) and, at the end, ``DIR/rank<r>.pt`` (its weights,
                        gathered whole when sharded).

Usage: ``DEMOPSD_TEST_HOOK=... python tests/instrumented_train.py <hydra overrides>``. The hook is read from
the environment and this file stays ``sys.argv[0]``, so the processes Lightning starts for DDP run it too.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(step: str) -> None:
    from demopsd.training.module import SelfDistillationModule

    train = SelfDistillationModule.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == int(step):
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


def record(directory: str) -> None:
    from demopsd.runtime.sharding import full_state
    from demopsd.training.module import SelfDistillationModule

    out = Path(directory)
    train, log_dict = SelfDistillationModule.training_step, SelfDistillationModule.log_dict

    def write(module, entry: dict) -> None:
        """One record, under the step the current batch started at (its updates advance global_step)."""
        step = getattr(module, "_recorded_step", module.global_step)
        with (out / f"rank{module.global_rank}.jsonl").open("a") as file:
            file.write(json.dumps({"step": step, **entry}) + "\n")

    def training_step(self, batch, batch_idx):
        self._recorded_step = self.global_step
        write(self, {"prompts": [example.idx for example in batch]})
        return train(self, batch, batch_idx)

    def logged(self, dictionary, *args, **kwargs):
        write(self, {"metrics": {k: float(v) for k, v in dictionary.items()}})
        return log_dict(self, dictionary, *args, **kwargs)

    def on_train_end(self):  # every process gathers; a sharded (trainer=fsdp) weight is saved whole
        torch.save({k: v.clone() for k, v in full_state(self)}, out / f"rank{self.global_rank}.pt")

    SelfDistillationModule.training_step, SelfDistillationModule.log_dict = training_step, logged
    SelfDistillationModule.on_train_end = on_train_end


if __name__ == "__main__":
    kind, _, argument = os.environ["DEMOPSD_TEST_HOOK"].partition(":")
    {"kill-at-step": kill_at_step, "kill-writing": kill_writing, "record": record}[kind](argument)
    sys.path.insert(0, str(REPO_ROOT / "src"))
    import train  # not runpy: that would make src/train.py argv[0], and DDP's processes would run it unhooked

    train.main()
