"""End to end: `debug=smoke` runs of every method on real SciKnowEval data.

The runs of each method use the 2-layer random Llama with the default model's tokenizer (the same code path in
seconds); the train-then-evaluate run of the command line uses the real default model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import demopsd.rollout.scored
from demopsd.config.check import validate_config
from demopsd.data.rewards import MCQScore
from demopsd.runtime.models import load_model_and_tokenizer
from demopsd.training.run import run
from demopsd.training.timing import PHASES
from tests.helpers import CONFIG_DIR, REPO_ROOT

pytestmark = pytest.mark.slow

COMMON_COLUMNS = [
    "train/reward_mean", "train/accuracy", "train/format_rate", "train/entropy", "train/response_length",
    "perf/rollout_tokens_per_s", "perf/step_seconds", "perf/rollout_seconds", "perf/student_forward_seconds",
    "perf/loss_seconds", "perf/backward_seconds", "perf/optimizer_seconds", "perf/ema_seconds",
    "perf/checkpoint_seconds",
]
DISTILL_COLUMNS = [
    "distill/loss", "distill/lambda_mean", "distill/discrepancy_mean", "distill/mask_fraction",
    "leakage/kl_teacher_student", "leakage/kl_target_student", "leakage/attenuation", "leakage/kl_teacher_student_full",
    "perf/teacher_forward_seconds",
]
# A random model never answers a SciKnowEval question, so the smoke runs take their learning signal from
# the reference-answer context (distillation) or from an alternating reward (GRPO).
SIGNAL = {
    "demopsd": ["method.reprompt.use_reference_answer=true"],
    "sdpo": ["method.reprompt.use_reference_answer=true"],
    "opsd": [],
    "grpo": [],
}


@pytest.fixture
def alternating_reward(monkeypatch):
    calls = iter(range(10**6))

    def score(completion, answer, letters="ABCD", rule="answer_tag"):
        correct = next(calls) % 2 == 0
        return MCQScore(reward=float(correct), correct=correct, well_formed=True, predicted=answer)

    monkeypatch.setattr(demopsd.rollout.scored, "score_mcq", score)


@pytest.fixture
def cache_dir(default_model_cache) -> Path:
    return default_model_cache[0]


def smoke_config(method: str, output_dir: Path, model_dir: Path, *extra: str):
    overrides = ["debug=smoke", f"method={method}", "data=sciknoweval/biology", f"paths.output_dir={output_dir}",
                 f"model.name_or_path={model_dir}", "logger.wandb.mode=disabled", *SIGNAL[method], *extra]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return validate_config(compose(config_name="train", overrides=overrides))


def initial_weights(settings) -> dict[str, torch.Tensor]:
    model, _ = load_model_and_tokenizer(settings.model.name_or_path, cache_dir=settings.paths.cache_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["demopsd", "sdpo", "opsd", "grpo"])
def test_smoke_run_logs_finite_metrics_and_updates_weights(method, tmp_path, tiny_model_dir, request):
    if method == "grpo":
        request.getfixturevalue("alternating_reward")
    cfg = smoke_config(method, tmp_path, tiny_model_dir)
    before = initial_weights(cfg)

    final = run(cfg)

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    expected = COMMON_COLUMNS + (DISTILL_COLUMNS if method != "grpo" else ["grpo/loss"])
    assert set(expected) <= set(metrics.columns), set(expected) - set(metrics.columns)
    for column in expected:
        values = metrics[column].dropna()
        logged = 1 if column == "perf/checkpoint_seconds" else 2  # the checkpoint's work is logged with the next step
        assert len(values) == logged, f"{column} logged {len(values)} times in 2 steps"
        assert values.map(math.isfinite).all(), f"{column} has non-finite values: {values.tolist()}"
    assert metrics["step"].max() == 1
    if method != "grpo":
        assert (metrics["distill/mask_fraction"].dropna() == 1.0).all()
        assert (metrics["distill/loss"].dropna() > 0).all()
        attenuation = metrics["leakage/attenuation"].dropna()
        if method in ("sdpo", "opsd"):  # the target is the teacher: it passes on the whole shift, at every step
            assert attenuation.tolist() == [1.0, 1.0]
        else:
            assert (attenuation < 1.0).all()

    after = load_file(tmp_path / "model" / "model.safetensors")
    changed = [k for k in after if k in before and not torch.equal(after[k], before[k])]
    assert len(changed) > len(after) // 2, f"only {len(changed)} of {len(after)} tensors changed"
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert set(expected) <= set(final)


def test_without_a_successful_sibling_nothing_is_distilled(tmp_path, tiny_model_dir):
    """SDPO's contexts come from successful siblings only: a batch with none has an all-zero mask and no update."""
    cfg = smoke_config("sdpo", tmp_path, tiny_model_dir, "trainer.max_steps=1", "method.reprompt.use_reference_answer=false",
                       "method.reprompt.success_threshold=2.0")
    before = initial_weights(cfg)
    run(cfg)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["distill/mask_fraction"].dropna().tolist() == [0.0]
    assert metrics["distill/loss"].dropna().tolist() == [0.0]
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in after if k in before)


# Token-for-token equal samples in two processes need bit-for-bit equal logits, which the same CPU kernels give on
# the same inputs when the thread count is the same and MKL runs in conditional-numerical-reproducibility mode.
THREADS = str(torch.get_num_threads())
REPRODUCIBLE_CPU = {"OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS, "MKL_CBWR": "AUTO"}
# Floats from the logits (entropy, letter probabilities) are compared within a float32 tolerance all the same.
FLOAT32 = {"rel": 1e-5, "abs": 1e-7}


def run_cli(script: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", **REPRODUCIBLE_CPU}
    result = subprocess.run([sys.executable, script, *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_train_with_evaluation_then_eval_of_its_checkpoint(tmp_path, cache_dir):
    """`src/train.py` writes its run directory and evaluates at the end; `src/eval.py` on the saved
    checkpoint with the same seed reproduces that evaluation answer for answer."""
    common = ["debug=smoke", "data=sciknoweval/physics", f"paths.cache_dir={cache_dir}", "eval.max_examples=3"]
    result = run_cli("src/train.py", *common, "~experiment", "method=demopsd", f"paths.log_dir={tmp_path / 'train'}",
                     "checkpoint.save_final_model=false", "trainer.max_steps=1", "eval.at_end=true")
    run_dirs = list((tmp_path / "train" / "smoke" / "runs").iterdir())
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert run_dir.name.endswith("demopsd_sciknoweval-physics_seed0")
    expected = ("metrics.csv", "config_resolved.yaml", ".hydra/config.yaml", "checkpoints/last.ckpt", "provenance.json")
    for name in expected:
        assert (run_dir / name).exists(), name
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["packages"]["torch"] == torch.__version__ and provenance["git"]["commit"]
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run missing"
    last_line = result.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last_line and "metrics.csv" in last_line

    metrics = pd.read_csv(run_dir / "metrics.csv")
    step = metrics.dropna(subset=["perf/step_seconds"]).iloc[0]
    phases = [f"perf/{phase}_seconds" for phase in PHASES if f"perf/{phase}_seconds" in step]
    assert sum(step[phases].dropna()) == pytest.approx(step["perf/step_seconds"], rel=0.05), step[phases]
    accuracy = metrics.dropna(subset=["eval/sciknoweval-physics/acc_avg@2"])
    assert accuracy["step"].tolist() == [1]
    assert accuracy["perf/eval_seconds"].iloc[0] > 0
    during_training = json.loads((run_dir / "eval" / "step000001" / "summary.json").read_text())
    assert during_training["metrics"]["eval/sciknoweval-physics/num_questions"] == 3
    assert during_training["metrics"]["eval/sciknoweval-physics/acc_avg@2"] == pytest.approx(accuracy.iloc[0][
        "eval/sciknoweval-physics/acc_avg@2"], **FLOAT32)  # read back from the CSV's decimal text

    result = run_cli("src/eval.py", *common, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "seed=1",
                     f"paths.log_dir={tmp_path / 'eval'}")
    eval_dir = next((tmp_path / "eval" / "smoke" / "runs").iterdir())
    assert str(eval_dir) in result.stdout.strip().splitlines()[-1]
    standalone = json.loads((eval_dir / "summary.json").read_text())
    assert standalone["metrics"] == pytest.approx(during_training["metrics"], **FLOAT32)
    samples, trained_samples = (
        [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]
        for directory in (eval_dir, run_dir / "eval" / "step000001")
    )
    assert [{**r, "letter_probs": None} for r in samples] == [{**r, "letter_probs": None} for r in trained_samples]
    for record, trained in zip(samples, trained_samples, strict=True):
        assert record["letter_probs"] == pytest.approx(trained["letter_probs"], **FLOAT32)


def tiny_run_metrics(tmp_path: Path, model_dir: Path, seed: int) -> pd.DataFrame:
    """One optimizer step of DemoPSD with 8-token responses; the metrics without the timings."""
    out = tmp_path / f"seed{seed}_{len(list(tmp_path.iterdir()))}"
    cfg = smoke_config("demopsd", out, model_dir, "trainer.max_steps=1", "data.batch_size=1", "rollout.max_new_tokens=8",
                       "checkpoint.save_final_model=false", f"seed={seed}")
    run(cfg)
    metrics = pd.read_csv(out / "metrics.csv")
    return metrics[[c for c in metrics.columns if not c.startswith("perf/")]]


def test_same_seed_same_metrics_different_seed_different(tmp_path, tiny_model_dir):
    """`seed=` fixes data order, rollout sampling and everything after: on one machine the metrics repeat."""
    first, again = tiny_run_metrics(tmp_path, tiny_model_dir, 0), tiny_run_metrics(tmp_path, tiny_model_dir, 0)
    pd.testing.assert_frame_equal(first, again)
    other = tiny_run_metrics(tmp_path, tiny_model_dir, 1)
    assert not first["train/entropy"].dropna().equals(other["train/entropy"].dropna())
