"""Many runs and many processes, on one CPU: multiruns of two-process DDP jobs (two jobs × two processes) in which
each job runs once, in one directory, through Hydra's basic launcher and through its submitit launcher (the local
executor of ``hydra/launcher=slurm``'s launcher); and the run directory every process of a launch agrees on."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from demopsd.runtime.launch import launch_stamp
from tests.helpers import REPO_ROOT, train_tiny

pytestmark = pytest.mark.slow



def sweep_jobs(log_dir: Path) -> list[Path]:
    """The job directories of the one multirun under ``log_dir`` (there must be exactly one, and no single run)."""
    assert not (log_dir / "smoke" / "runs").exists(), "a process ran outside the sweep's job directories"
    (sweep,) = (log_dir / "smoke" / "multiruns").iterdir()
    return sorted(path for path in sweep.iterdir() if path.is_dir() and not path.name.startswith("."))


def logged_steps(run_dir: Path) -> list[int]:
    return pd.read_csv(run_dir / "metrics.csv").dropna(subset=["train/response_length"])["step"].tolist()


@pytest.mark.parametrize(
    "env, stamp",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "81", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "16"}, "slurm81.0"),
        ({"SLURM_JOB_ID": "81", "SLURM_STEP_ID": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8",
          "SLURM_RESTART_COUNT": "1"}, "slurm81.2-restart1"),
        ({"SLURM_JOB_ID": "81", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}, None),
        ({"TORCHELASTIC_RUN_ID": "job7", "WORLD_SIZE": "16", "TORCHELASTIC_RESTART_COUNT": "0"}, "torchrun-job7"),
        ({"TORCHELASTIC_RUN_ID": "job7", "WORLD_SIZE": "1"}, None),
    ],
)
def test_the_launch_names_the_run_directory_where_several_processes_compose_it(env, stamp):
    assert launch_stamp(env) == stamp


def test_torchrun_without_a_rendezvous_id_stops_and_says_what_to_pass():
    with pytest.raises(SystemExit, match="--rdzv-id"):
        launch_stamp({"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2"})


TWO_DDP_JOBS = ("seed=0,1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2",
                "checkpoint.every_n_train_steps=0")


def ran_each_job_once(result: subprocess.CompletedProcess, log_dir: Path) -> list[Path]:
    """The two job directories of a :data:`TWO_DDP_JOBS` sweep, checked: each holds one run of two steps, with both
    processes in it (the second process's Hydra log lies there), and no sweep was started again inside a job."""
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sweep_jobs(log_dir)
    print("\n".join(str(job) for job in jobs))
    assert [job.name for job in jobs] == ["0_demopsd_synthetic-mixed_seed0", "1_demopsd_synthetic-mixed_seed1"]
    for job in jobs:
        assert logged_steps(job) == [0, 1], job
        assert "GLOBAL_RANK: 1" in (job / "train_ddp_process_1.log").read_text(), job
    return jobs


def test_a_ddp_multirun_runs_each_job_once_in_its_own_directory(tmp_path, tiny_model_dir):
    """With a config directory of the command line's (``callbacks=quiet`` is only there): the job's further
    processes compose from it too."""
    extra = tmp_path / "extra_conf" / "callbacks"
    extra.mkdir(parents=True)
    (extra / "quiet.yaml").write_text("{}\n")
    result = train_tiny(tmp_path, tiny_model_dir, *TWO_DDP_JOBS, "callbacks=quiet",
                        flags=("-m", "--config-dir", str(extra.parent)))
    ran_each_job_once(result, tmp_path)


def test_the_local_launcher_runs_the_sweep_as_local_processes(tmp_path, tiny_model_dir):
    """``hydra/launcher=local``: each job a process of its own under submitit, with its log in .submitit/, and the
    second DDP process, which Lightning starts from submitit's entry point (a module, not src/train.py), in it."""
    result = train_tiny(tmp_path, tiny_model_dir, "hydra/launcher=local", *TWO_DDP_JOBS, flags=("-m",))
    jobs = ran_each_job_once(result, tmp_path)
    submitted = [folder for folder in (jobs[0].parent / ".submitit").iterdir() if folder.name.isdigit()]
    assert len(submitted) == 2  # one folder per job, named by the process id of the job's controller
    logs = [next(folder.glob("*_0_log.out")).read_text() for folder in submitted]
    assert all("Job completed successfully" in log for log in logs)
    for job in jobs:
        assert sum(f"Outputs in {job}:" in log for log in logs) == 1, job


def test_torchrun_processes_agree_on_one_run_directory(tmp_path, tiny_model_dir):
    overrides = ["experiment=leakage_laptop", "debug=smoke", f"model.name_or_path={tiny_model_dir}",
                 f"paths.log_dir={tmp_path}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.max_steps=2", "checkpoint.every_n_train_steps=0", "checkpoint.save_final_model=false",
                 "rollout.max_new_tokens=8", "logger.wandb.mode=offline"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run([*torchrun, "src/train.py", *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "smoke" / "runs").iterdir()
    print(run_dir)
    assert run_dir.name.startswith("torchrun-") and run_dir.name.endswith("_demopsd_synthetic-mixed_seed0")
    assert logged_steps(run_dir) == [0, 1]
    assert "GLOBAL_RANK: 1" in (run_dir / "train.log").read_text()  # the second process logged into the same run
