"""Where a training step's time goes: the step clock's arithmetic, and the phases a real module logs."""

import time

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import demopsd.training.steps
import demopsd.training.timing
from demopsd.training.timing import PHASES, StepClock, TimedModelCheckpoint
from tests.fixed_step import example, setup_step


class FakeTime:
    """``time.perf_counter`` that only moves when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_time(monkeypatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(demopsd.training.timing.time, "perf_counter", fake)
    return fake


def test_clock_adds_up_each_phase_and_leaves_excluded_time_out_of_the_step(fake_time):
    clock = StepClock()
    clock.start_step()
    with clock.phase("rollout"):
        fake_time.now += 2.0
    fake_time.now += 0.5  # between phases: in the step, in no phase
    with clock.phase("loss"):
        fake_time.now += 1.0
    with clock.phase("loss"):  # a phase that runs twice adds up
        fake_time.now += 0.25
    clock.exclude(4.0)
    fake_time.now += 4.0  # an evaluation
    assert clock.metrics() == {
        "perf/rollout_seconds": 2.0, "perf/loss_seconds": 1.25, "perf/step_seconds": 3.75,
    }
    clock.start_step()
    assert clock.metrics() == {"perf/step_seconds": 0.0}


def test_a_lap_ends_the_step_where_the_next_begins(fake_time):
    """What happens after one lap (a checkpoint) counts in the next step, with its own phase."""
    clock = StepClock()
    clock.start_step()
    with clock.phase("loss"):
        fake_time.now += 1.0
    clock.exclude(0.5)
    fake_time.now += 0.5
    assert clock.lap() == {"perf/loss_seconds": 1.0, "perf/step_seconds": 1.0}
    with clock.phase("checkpoint"):
        fake_time.now += 3.0
    fake_time.now += 0.25
    with clock.phase("loss"):
        fake_time.now += 2.0
    assert clock.lap() == {"perf/checkpoint_seconds": 3.0, "perf/loss_seconds": 2.0, "perf/step_seconds": 5.25}
    assert clock.lap() == {"perf/step_seconds": 0.0}


def test_a_phase_that_raises_is_still_counted(fake_time):
    clock = StepClock()
    clock.start_step()
    with pytest.raises(RuntimeError), clock.phase("rollout"):
        fake_time.now += 1.5
        raise RuntimeError
    assert clock.seconds == {"rollout": 1.5}


RESPONSES = [f"Reasoning {i}. <answer>A</answer>" for i in range(4)]


def slowed(function, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return slow


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy machine a second one stalls the first at every parallel region for a time
    slice of the scheduler (a quarter of a second was seen), as long as the delays below are apart."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["demopsd", "grpo"])
def test_each_phase_is_logged_where_its_work_happens_and_the_phases_fit_in_the_step(method, tmp_path, monkeypatch,
                                                                                   one_thread):
    """Known delays put into the rollouts (0.9 s), the loss (1.4 s), the EMA update (0.4 s) and the checkpoint
    (0.6 s) show up in their own phase and nowhere else, the checkpoint with the step after the one it saves; the
    phases never add up to more than the step."""
    step = setup_step(monkeypatch, method, RESPONSES, [1.0, 0.0, 1.0, 0.0], "rollout.n=4")
    step.rollouts.generate = slowed(step.rollouts.generate, 0.9)
    monkeypatch.setattr(demopsd.training.steps, "ema_update", slowed(demopsd.training.steps.ema_update, 0.4))
    loss = "chunked_distillation" if method == "demopsd" else "grpo_loss"
    monkeypatch.setattr(demopsd.training.steps, loss, slowed(getattr(demopsd.training.steps, loss), 1.4))
    monkeypatch.setattr(L.Trainer, "save_checkpoint", slowed(L.Trainer.save_checkpoint, 0.6))
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[TimedModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2)],
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(step.module, train_dataloaders=DataLoader([[example("Q?", "A")]] * 3, batch_size=None,
                                                          collate_fn=list))

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    logged = {c.removeprefix("perf/").removesuffix("_seconds") for c in metrics if c.endswith("_seconds")}
    ran = set(PHASES) - {"old_log_probs"} - ({"teacher_forward"} if method == "grpo" else set())  # one update a step
    assert logged == ran | {"step"}
    rows = metrics.dropna(subset=["perf/step_seconds"])
    assert len(rows) == 3
    # the checkpoint callback's work after a step is logged with the next one: the save after the second with the third
    checkpoint = rows["perf/checkpoint_seconds"]
    assert checkpoint.isna().tolist() == [True, False, False]
    assert checkpoint.iloc[1] < 0.4 and 0.6 <= checkpoint.iloc[2] < 1.0
    phases = rows[[f"perf/{p}_seconds" for p in ran]].fillna(0.0)
    assert (phases >= 0).all().all()
    assert (phases.sum(axis=1) <= rows["perf/step_seconds"]).all()
    # each delay is in its own phase, and no phase holds another's (the delays differ by 0.2 s or more)
    assert rows["perf/rollout_seconds"].between(0.9, 1.3).all()
    assert rows["perf/loss_seconds"].between(1.4, 1.8).all()
    if method == "demopsd":
        assert rows["perf/ema_seconds"].between(0.4, 0.8).all()
    else:
        assert (rows["perf/ema_seconds"] < 0.4).all()
    others = phases.drop(columns=["perf/rollout_seconds", "perf/loss_seconds", "perf/ema_seconds",
                                  "perf/checkpoint_seconds"])
    assert (others < 0.4).all().all(), others
