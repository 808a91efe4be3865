"""Crash-safe resume: which checkpoint is continued, atomic writes, and SIGKILL fault injection end to end."""

import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pandas as pd
import pytest
import torch

from demopsd.runtime.checkpoints import AtomicCheckpointIO, partial_path
from demopsd.runtime.resume import kept_metrics_lines, resolve_checkpoint
from demopsd.training.run import checkpointing
from tests.helpers import train_tiny

RUN = "demopsd_synthetic-mixed_seed0"


def touch_checkpoint(path: Path, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"ckpt")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_a_run_directory_resolves_to_its_newest_checkpoint_even_without_last(tmp_path):
    run_dir = tmp_path / "2026-01-01_00-00-00_x"
    touch_checkpoint(run_dir / "checkpoints" / "step000002.ckpt", age_s=20)
    newest = touch_checkpoint(run_dir / "checkpoints" / "step000004.ckpt", age_s=10)
    partial_path(run_dir / "checkpoints" / "step000006.ckpt").write_bytes(b"half")  # a write cut short

    point = resolve_checkpoint(run_dir, tmp_path, "x")

    assert point.checkpoint == newest.resolve() and point.run_dir == run_dir.resolve()


def test_last_follows_the_link_and_picks_the_newest_run_of_that_name(tmp_path):
    old = touch_checkpoint(tmp_path / f"2026-01-01_00-00-00_{RUN}" / "checkpoints" / "step000002.ckpt", age_s=100)
    new_run = tmp_path / f"2026-01-02_00-00-00_{RUN}"
    target = touch_checkpoint(new_run / "checkpoints" / "step000002.ckpt", age_s=50)
    (new_run / "checkpoints" / "last.ckpt").symlink_to("step000002.ckpt")
    touch_checkpoint(tmp_path / "2026-01-03_00-00-00_other_run" / "checkpoints" / "step000002.ckpt")
    (tmp_path / f"2026-01-04_00-00-00_{RUN}").mkdir()  # a launch that died before its first checkpoint

    point = resolve_checkpoint("last", tmp_path, RUN)

    assert point.checkpoint == target.resolve() != old.resolve()
    assert point.run_dir == new_run.resolve()


@pytest.mark.parametrize("given, message", [
    ("last", "ckpt_path=last found no run to continue"),
    ("missing.ckpt", "ckpt_path=missing.ckpt is not a checkpoint: no such file"),
    (".", "is not a checkpoint: no checkpoints/\\*.ckpt in it"),
])
def test_nothing_to_resume_names_what_was_tried(tmp_path, monkeypatch, given, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=message):
        resolve_checkpoint(given, tmp_path, RUN)


def test_the_metrics_rows_the_checkpoint_covers_are_kept(tmp_path):
    """Checkpoint at step 2: written after the evaluation row of step 2, before the training row of step 1."""
    csv = tmp_path / "metrics.csv"
    csv.write_text("eval,loss,step\n,1.0,0\n0.5,,2\n,0.5,1\n,0.25,2\n1.0,,3\n")
    kept = ["eval,loss,step\n", ",1.0,0\n", "0.5,,2\n", ",0.5,1\n"]
    assert kept_metrics_lines(csv, 3, global_step=2) == kept
    assert len(kept_metrics_lines(csv, None, None)) == 6  # a checkpoint that does not say: keep everything
    assert kept_metrics_lines(tmp_path / "missing.csv", 3, 2) == []


def test_an_interrupted_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)

    def interrupted(obj, file, *args, **kwargs):
        file.write(b"\0" * 64)
        raise KeyboardInterrupt  # stands in for the process dying mid-write

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()

    assert io.load_checkpoint(path)["step"] == 1
    assert partial_path(path).exists()


# ---------------------------------------------------------------------------------- SIGKILL, end to end
def run_dir_of(log_dir: Path) -> Path:
    (run_dir,) = [d for d in (log_dir / "smoke" / "runs").iterdir() if (d / "checkpoints").is_dir()]
    return run_dir


def step_metrics(run_dir: Path) -> pd.DataFrame:
    """Training metrics by step, timings left out (they differ from run to run)."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["data/skipped_rows"].notna().sum() == 1  # logged once, not again by the resumed run
    train = metrics.dropna(subset=["train/reward_mean"])
    assert not train["step"].duplicated().any(), "a step was logged twice"
    columns = [c for c in train.columns if c.startswith(("train/", "distill/", "leakage/"))]
    return train.set_index("step")[columns].sort_index()


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)


# Compared within a float32 tolerance: the resumed process repeats the same computation, but CPU kernels do
# not promise the same last bits in another process. A state that is off by one EMA update fails it.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-7}


def assert_same_state(resumed: dict, uninterrupted: dict) -> None:
    assert resumed["global_step"] == uninterrupted["global_step"] == 4
    for name, tensor in uninterrupted["state_dict"].items():
        assert torch.allclose(resumed["state_dict"][name], tensor, **TOLERANCE), name  # policy and EMA teacher
    moments = [(a, b) for s, t in zip(resumed["optimizer_states"][0]["state"].values(),
                                      uninterrupted["optimizer_states"][0]["state"].values()) for a, b in
               ((s["exp_avg"], t["exp_avg"]), (s["exp_avg_sq"], t["exp_avg_sq"]))]
    assert moments and all(torch.allclose(a, b, rtol=1e-3, atol=1e-12) for a, b in moments)
    assert resumed["lr_schedulers"] == uninterrupted["lr_schedulers"]  # Python floats of the step count: exact


@pytest.mark.slow
def test_the_resume_comparisons_are_not_trivial(uninterrupted):
    """Steps 2-3 move the weights far beyond the tolerance, and the step metrics are well above rounding."""
    step2 = torch.load(uninterrupted / "checkpoints" / "step000002.ckpt", map_location="cpu", weights_only=False)
    step4 = final_state(uninterrupted)
    policy = [k for k in step4["state_dict"] if k.startswith("policy.")]
    assert any(not torch.allclose(step4["state_dict"][k], step2["state_dict"][k], **TOLERANCE) for k in policy)
    assert (step_metrics(uninterrupted)["leakage/kl_teacher_student"] > 1e-3).all()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train_tiny(log_dir, tiny_model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = run_dir_of(log_dir)
    (run_dir.parent / f"{run_dir.name}.console.txt").write_text(result.stdout + result.stderr)
    return run_dir


@pytest.mark.slow
def test_a_run_prints_none_of_the_notices_it_raises_by_design_and_lightnings_lines_once(uninterrupted):
    console = (uninterrupted.parent / f"{uninterrupted.name}.console.txt").read_text()
    for notice in ("Tip:", "litlogger", "LeafSpec", "in eval mode", "transfer_batch_to_device",
                   "Previous log files in this directory will be deleted"):
        assert notice not in console, notice
    assert console.count("GPU available:") == 1


@pytest.mark.slow
def test_killed_mid_training_resumes_the_same_run_with_the_same_metrics(tmp_path, tiny_model_dir, uninterrupted):
    killed = train_tiny(tmp_path, tiny_model_dir, hook="kill-at-step:3")
    assert killed.returncode == -signal.SIGKILL
    run_dir = run_dir_of(tmp_path)
    assert 2 in step_metrics(run_dir).index  # step 2 was logged after the step-2 checkpoint: it is redone

    resumed = train_tiny(tmp_path, tiny_model_dir, "ckpt_path=last")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dir_of(tmp_path) == run_dir
    expected = step_metrics(uninterrupted)
    pd.testing.assert_frame_equal(step_metrics(run_dir), expected, **TOLERANCE)
    assert list(expected.index) == [0, 1, 2, 3]
    assert_same_state(final_state(run_dir), final_state(uninterrupted))
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({d.name.rsplit("-", 1)[-1] for d in wandb_runs}) == 1, wandb_runs


@pytest.mark.slow
def test_killed_mid_checkpoint_write_resumes_from_the_last_whole_checkpoint(tmp_path, tiny_model_dir, uninterrupted):
    killed = train_tiny(tmp_path, tiny_model_dir, hook="kill-writing:step000004.ckpt")
    assert killed.returncode == -signal.SIGKILL
    run_dir = run_dir_of(tmp_path)
    checkpoints = run_dir / "checkpoints"
    assert partial_path(checkpoints / "step000004.ckpt").exists()
    assert not (checkpoints / "step000004.ckpt").exists()

    resumed = train_tiny(tmp_path, tiny_model_dir, f"ckpt_path={run_dir}")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr + resumed.stdout and "step000002.ckpt" in resumed.stderr + resumed.stdout
    pd.testing.assert_frame_equal(step_metrics(run_dir), step_metrics(uninterrupted), **TOLERANCE)
    assert_same_state(final_state(run_dir), final_state(uninterrupted))


def test_a_changed_config_on_resume_is_reported_key_by_key(tmp_path, caplog):
    from omegaconf import OmegaConf

    from demopsd.training.run import warn_about_changed_config

    saved = tmp_path / "config_resolved.yaml"
    OmegaConf.save(OmegaConf.create({"seed": 0, "optim": {"lr": 1e-5}, "ckpt_path": None}), saved)
    now = {"seed": 0, "optim": {"lr": 2e-5}, "ckpt_path": "last"}
    with caplog.at_level("WARNING"):
        warn_about_changed_config(saved, now)
    assert "optim.lr: 1e-05 -> 2e-05" in caplog.text
    assert "ckpt_path" not in caplog.text and "seed" not in caplog.text


def test_saved_random_states_replay_the_same_draws():
    import random

    import numpy as np

    from demopsd.runtime.resume import RunStateCheckpoint, plain_rng_states

    saved = torch.load(_round_trip(plain_rng_states()), weights_only=True)  # loads without pickled numpy arrays
    draws = (random.random(), np.random.rand(), torch.rand(3))
    callback = RunStateCheckpoint()
    callback.load_state_dict({"rng": saved})  # a checkpoint from before the per-process states
    callback.on_train_start(SimpleNamespace(world_size=1, global_rank=0), None)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])


def test_each_process_gets_its_own_random_state_back(caplog):
    from demopsd.runtime.resume import RunStateCheckpoint, plain_rng_states

    states, draws = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(plain_rng_states())
        draws.append(torch.rand(2))
    saved = {"rng": states[0], "rng_per_process": states}
    for rank in (0, 1):
        callback = RunStateCheckpoint()
        callback.load_state_dict(saved)
        callback.on_train_start(SimpleNamespace(world_size=2, global_rank=rank), None)
        assert torch.equal(torch.rand(2), draws[rank])

    callback = RunStateCheckpoint()
    callback.load_state_dict(saved)
    with caplog.at_level("WARNING"):
        callback.on_train_start(SimpleNamespace(world_size=3, global_rank=2), None)
    assert torch.equal(torch.rand(2), draws[0])
    assert "random states of 2 process(es) and this run has 3" in caplog.text


def _round_trip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_checkpoint_every_zero_steps_means_none_and_negative_is_refused(tmp_path):
    from demopsd.config.sections import CheckpointConfig

    (periodic,) = checkpointing(3, tmp_path)
    assert periodic.dirpath == str(tmp_path) and periodic._every_n_train_steps == 3 and periodic.save_last == "link"
    assert checkpointing(0, tmp_path) == []
    with pytest.raises(ValueError, match=r"every_n_train_steps=-1 is invalid: 0 \(no checkpoints\)"):
        CheckpointConfig(every_n_train_steps=-1)
    for keep in (0, -2):
        with pytest.raises(ValueError, match=rf"checkpoint.keep={keep} is invalid: a positive number"):
            CheckpointConfig(keep=keep)


@pytest.mark.parametrize("keep, kept", [(1, ["step000006.ckpt"]), (2, ["step000004.ckpt", "step000006.ckpt"]),
                                        (-1, ["step000002.ckpt", "step000004.ckpt", "step000006.ckpt"])])
def test_only_the_newest_checkpoints_stay_on_disk(tmp_path, keep, kept):
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = L.Trainer(max_steps=6, callbacks=checkpointing(2, tmp_path, keep), logger=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(BoringModel())
    assert sorted(p.name for p in tmp_path.glob("step*.ckpt")) == kept
    assert (tmp_path / "last.ckpt").resolve().name == "step000006.ckpt"


def test_processes_after_the_first_draw_their_own_reproducible_streams():
    from demopsd.training.run import ProcessSeeds

    def draws_after_setup(rank: int) -> torch.Tensor:
        torch.manual_seed(7)  # what seed_everything(seed=7) did in every process
        ProcessSeeds(7).setup(SimpleNamespace(global_rank=rank), None, "fit")
        return torch.rand(3)

    torch.manual_seed(7)
    single_process = torch.rand(3)
    assert torch.equal(draws_after_setup(0), single_process)
    second, third = draws_after_setup(1), draws_after_setup(2)
    assert not torch.equal(second, single_process) and not torch.equal(second, third)
    assert torch.equal(draws_after_setup(1), second)
