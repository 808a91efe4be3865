"""How the processes of a launch agree: the run directory's name under srun or torchrun, and one job of a Hydra
multirun per process group under ``trainer=ddp`` / ``trainer=fsdp`` (``src/train.py`` uses both)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

RUN_STAMP = "DEMOPSD_RUN_STAMP"
"""Names the run directory in place of the date and time (conf/train.yaml's ``hydra:`` block)."""


def launch_stamp(env: Mapping[str, str]) -> str | None:
    """A name for the run directory that every process of one srun or torchrun launch agrees on; None outside one.

    Each process composes its own config, and ``${now:}`` can read another second in each, which would split
    the run over several directories. srun's job and step and torchrun's rendezvous id are the same in all the
    processes (and a restart, which starts fresh processes, gets its own name). torchrun without a rendezvous id
    (``none``, its default) shares nothing that names the launch: that stops with what to pass.
    """
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return with_restarts(f"slurm{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}", env.get("SLURM_RESTART_COUNT"))
    if int(env.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in env:
        if env["TORCHELASTIC_RUN_ID"] == "none":
            raise SystemExit(
                "torchrun without a rendezvous id: its processes could name the run directory differently. Pass "
                f"--rdzv-id=<id, the same on every node> (or --standalone on one node), or set {RUN_STAMP}=<name> "
                "on every node."
            )
        return with_restarts(f"torchrun-{env['TORCHELASTIC_RUN_ID']}", env.get("TORCHELASTIC_RESTART_COUNT"))
    return None


def with_restarts(name: str, restarts: str | None) -> str:
    return f"{name}-restart{restarts}" if restarts not in (None, "", "0") else name


@contextlib.contextmanager
def sweep_job(script: str) -> Iterator[None]:
    """Under ``-m``, one job of the sweep of the entry point ``script``, run by every process Lightning starts for
    it, leaving the process as it found it for the next job; outside ``-m``, nothing.

    Lightning starts the further processes of ``trainer=ddp`` / ``trainer=fsdp`` as this command again,
    ``sys.argv``, plus ``hydra.run.dir=`` the config's *run* directory (``_hydra_subprocess_cmd``,
    lightning.fabric's subprocess launcher): under ``-m`` that would be the whole sweep again in each process
    (Lightning PR #18175, Hydra issue #2070). Here the command becomes this job's overrides in run mode, and the
    run directory this job's own. Lightning also leaves its process group open and the group's address and
    ranks in ``os.environ``, where the next job in this process would take them for a launch from outside.
    """
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        yield
        return
    entry = sys.modules["__main__"]
    if entry.__spec__ is not None:  # a launcher's module (submitit's `python -m submitit.core._submit`), not ours
        entry.__spec__ = None  # Lightning then starts the script sys.argv[0] names
        sys.argv[0] = script
    config_dirs = [f"--config-dir={source.path}" for source in hydra_cfg.runtime.config_sources
                   if source.provider == "command-line"]
    hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]
    sys.argv[1:] = [f"--config-name={hydra_cfg.job.config_name}", *config_dirs, *hydra_overrides,
                    *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    environment = dict(os.environ)
    try:
        yield
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)


def name_the_launch() -> None:
    """Set :data:`RUN_STAMP` from the launcher, unless it is set (before Hydra composes the run directory)."""
    if RUN_STAMP not in os.environ and (stamp := launch_stamp(os.environ)):
        os.environ[RUN_STAMP] = stamp
