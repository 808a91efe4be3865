"""Two processes on one CPU (DDP over gloo): the step's prompts are shared without overlap, metrics are the
mean over the processes, and the weights stay identical on both."""

import json

import pandas as pd
import pytest
import torch

from tests.helpers import train_tiny

pytestmark = pytest.mark.slow


def records(directory, rank: int) -> list[dict]:
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


def test_two_process_ddp_smoke_run(tmp_path, tiny_model_dir):
    hooks = tmp_path / "records"
    hooks.mkdir()
    result = train_tiny(
        tmp_path / "logs", tiny_model_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "data.batch_size=4", "trainer.max_steps=2", "method=demopsd", hook=f"record:{hooks}",
    )
    assert result.returncode == 0, result.stderr[-3000:]

    rank0, rank1 = records(hooks, 0), records(hooks, 1)
    prompts = [{r["step"]: r["prompts"] for r in rank if "prompts" in r} for rank in (rank0, rank1)]
    assert sorted(prompts[0]) == sorted(prompts[1]) == [0, 1]
    for step in (0, 1):
        assert len(prompts[0][step]) == len(prompts[1][step]) == 2
        assert not set(prompts[0][step]) & set(prompts[1][step]), f"step {step}: a prompt went to both processes"
    assert len({i for p in prompts for step in p.values() for i in step}) == 8  # 2 steps x 4 distinct prompts

    (run_dir,) = (tmp_path / "logs" / "smoke" / "runs").iterdir()
    logged = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["train/response_length"]).set_index("step")
    local = [{r["step"]: r["metrics"] for r in rank if "train/entropy" in r.get("metrics", {})}  # the step's own
             for rank in (rank0, rank1)]
    for step in (0, 1):
        for name in ("train/response_length", "leakage/kl_teacher_student", "train/entropy"):
            mean = (local[0][step][name] + local[1][step][name]) / 2
            assert logged.loc[step, name] == pytest.approx(mean, rel=1e-5), (step, name)

    weights = [torch.load(hooks / f"rank{r}.pt") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() and any(k.startswith("teacher.") for k in weights[0])
    # Exact across the processes: the all-reduce hands both the same gradient bytes, and the optimizer and EMA
    # updates are elementwise on equal inputs (a sum of two floats is the same in either order).
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # policy and EMA teacher
