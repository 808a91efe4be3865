"""Two processes on one CPU with trainer=fsdp (FSDP2 over gloo) against the same run with trainer=ddp: same
prompts, same metrics, same weights after the steps, same evaluation; sharded checkpoints resume the run and
load for evaluation, and the final model directory holds the whole policy. Under trainer=fsdp only the first
process reads the weights and fills the other's shards (tests/test_sharded_loading.py checks that step alone), so
these runs check it end to end too."""

import json

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from demopsd.config.run import EvalRunSettings
from demopsd.config.sections import ModelConfig, PathsConfig
from demopsd.evaluation.runner import load_policy
from tests.helpers import train_tiny

pytestmark = pytest.mark.slow

TWO_CPU_PROCESSES = ["trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4", "method=demopsd"]
FSDP = ["trainer=fsdp", *TWO_CPU_PROCESSES, "fsdp.param_dtype=float32"]  # fp32 to compare with DDP exactly


def records(directory, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]


def by_step(entries: list[dict], key: str) -> dict:
    return {e["step"]: e[key] for e in entries if key in e and (key != "metrics" or "train/entropy" in e[key])}


def run_dir(log_dir):
    (directory,) = (log_dir / "smoke" / "runs").glob("*_seed0")
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The two-step run under trainer=ddp and trainer=fsdp, each with an evaluation at the end."""
    done = {}
    for kind in ("ddp", "fsdp"):
        base = tmp_path_factory.mktemp(kind)
        (base / "records").mkdir()
        overrides = FSDP if kind == "fsdp" else ["trainer=ddp", *TWO_CPU_PROCESSES]
        result = train_tiny(
            base / "logs", tiny_model_dir, *overrides, "trainer.max_steps=2", "eval.at_end=true",
            "eval.max_examples=2", "checkpoint.save_final_model=true", hook=f"record:{base / 'records'}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        done[kind] = base
    return done


def test_fsdp_trains_like_ddp(runs, tiny_model_dir):
    ddp, fsdp = runs["ddp"] / "records", runs["fsdp"] / "records"
    for rank in (0, 1):
        assert by_step(records(fsdp, rank), "prompts") == by_step(records(ddp, rank), "prompts")
        sharded, replicated = by_step(records(fsdp, rank), "metrics"), by_step(records(ddp, rank), "metrics")
        assert sorted(sharded) == [0, 1]
        for step in (0, 1):
            for name in ("train/response_length", "train/entropy", "leakage/kl_teacher_student", "distill/loss"):
                assert sharded[step][name] == pytest.approx(replicated[step][name], rel=1e-5), (rank, step, name)

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    sharded, replicated = torch.load(fsdp / "rank0.pt"), torch.load(ddp / "rank0.pt")
    assert sharded.keys() == replicated.keys() and any(k.startswith("teacher.") for k in sharded)
    for name, weight in sharded.items():
        update = replicated[name] - initial[name.split(".", 1)[1]]
        assert update.abs().max() > 1e-6, f"{name} did not move: the comparison would be empty"
        # rounding of the weights' magnitude, and far below the steps' update (of the policy and the EMA teacher)
        torch.testing.assert_close(weight, replicated[name], rtol=1e-6, atol=1e-2 * update.abs().max().item())
    assert all(torch.equal(w, torch.load(fsdp / "rank1.pt")[k]) for k, w in sharded.items())  # one all-gather's copies


def test_fsdp_evaluates_once_like_ddp(runs):
    summaries = {}
    for kind, base in runs.items():
        (step_dir,) = (run_dir(base / "logs") / "eval").iterdir()
        assert step_dir.name == "step000002"
        summaries[kind] = json.loads((step_dir / "summary.json").read_text())["metrics"]
    assert summaries["fsdp"].keys() == summaries["ddp"].keys()
    for name, value in summaries["ddp"].items():
        assert summaries["fsdp"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_sharded_checkpoint_and_final_model_hold_the_trained_policy(runs):
    directory = run_dir(runs["fsdp"] / "logs")
    checkpoint = directory / "checkpoints" / "step000002.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per process
    trained = {k.removeprefix("policy."): v for k, v in torch.load(runs["fsdp"] / "records" / "rank0.pt").items()
               if k.startswith("policy.")}

    final = AutoModelForCausalLM.from_pretrained(directory / "model")
    assert final.config.architectures == ["LlamaForCausalLM"]
    saved = OmegaConf.load(directory / "config_resolved.yaml")
    settings = EvalRunSettings(ckpt_path=str(checkpoint), model=ModelConfig(saved.model.name_or_path),
                               paths=PathsConfig(cache_dir=saved.paths.cache_dir))
    from_checkpoint, _, _ = load_policy(settings)
    for model in (final, from_checkpoint):
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)  # the same bytes, saved and loaded


def test_fsdp_resumes_from_its_sharded_checkpoint(tmp_path, tiny_model_dir):
    steps = ["trainer.max_steps=3", "checkpoint.every_n_train_steps=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for base in (whole, cut):
        (base / "records").mkdir(parents=True)
    result = train_tiny(whole / "logs", tiny_model_dir, *FSDP, *steps, hook=f"record:{whole / 'records'}")
    assert result.returncode == 0, result.stderr[-3000:]
    result = train_tiny(cut / "logs", tiny_model_dir, *FSDP, "trainer.max_steps=2", "checkpoint.every_n_train_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_dir = run_dir(cut / "logs")
    result = train_tiny(cut / "logs", tiny_model_dir, *FSDP, *steps, f"ckpt_path={resumed_dir}",
                        hook=f"record:{cut / 'records'}")
    assert result.returncode == 0, result.stderr[-3000:]

    output = result.stdout + result.stderr
    assert "Resuming from" in output and "step000002.ckpt" in output
    for rank in (0, 1):  # each process continues from its own weights shard, optimizer state and random state
        resumed, uninterrupted = records(cut / "records", rank), records(whole / "records", rank)
        assert sorted(by_step(resumed, "prompts")) == [2]  # only the step after the checkpoint ran again
        assert by_step(resumed, "prompts")[2] == by_step(uninterrupted, "prompts")[2]
        for name in ("train/response_length", "train/entropy", "leakage/kl_teacher_student", "distill/loss"):
            assert by_step(resumed, "metrics")[2][name] == pytest.approx(
                by_step(uninterrupted, "metrics")[2][name], rel=1e-5), (rank, name)
    resumed, uninterrupted = torch.load(cut / "records" / "rank0.pt"), torch.load(whole / "records" / "rank0.pt")
    for name, weight in resumed.items():
        torch.testing.assert_close(weight, uninterrupted[name], rtol=1e-6, atol=1e-7)
    logged = pd.read_csv(resumed_dir / "metrics.csv").dropna(subset=["train/entropy"])
    assert logged["step"].tolist() == [0, 1, 2]
