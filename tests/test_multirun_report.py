"""End to end: a Hydra multirun of two methods (`debug=smoke`), then `src/report.py` on its folder.

The numbers in results.csv are recomputed here from the two runs' metrics.csv with plain pandas.
"""

import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The 135M model rarely answers in 24 tokens, so DemoPSD's teacher is shown the reference answer (as in
# test_train_smoke.py). GRPO has no `method.reprompt` (the config check rejects the key there), so the
# override cannot go on the command line of a multirun over both: it lives in a method option of an extra
# config dir, `demopsd` plus the reference answer, still named demopsd. `--config-dir` (unlike
# `hydra.searchpath=`) is part of the app's search path, where the config check composes its reference.
# GRPO's losses may be zero here: no sibling is right, so every advantage is zero.
DEMOPSD_WITH_ANSWER = """\
defaults:
  - demopsd
  - _self_
reprompt:
  use_reference_answer: true
"""


def run_cli(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def final_entropy(metrics_csv) -> float:
    frame = pd.read_csv(metrics_csv)
    return float(frame.dropna(subset=["train/entropy"]).sort_values("step", kind="stable")["train/entropy"].iloc[-1])


def test_multirun_of_two_methods_then_report(tmp_path, default_model_cache):
    cache_root, _ = default_model_cache
    extra_conf = tmp_path / "conf"
    (extra_conf / "method").mkdir(parents=True)
    (extra_conf / "method" / "demopsd_answer.yaml").write_text(DEMOPSD_WITH_ANSWER, encoding="utf-8")
    sweep_dir = tmp_path / "multirun"

    run_cli(
        "src/train.py", "-m", "--config-dir", str(extra_conf),
        "debug=smoke", "method=demopsd_answer,grpo", "data=sciknoweval/biology",
        f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={cache_root}", "logger.wandb.mode=disabled",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=1800,
    )
    runs = {}
    for metrics_csv in sorted(sweep_dir.glob("*/metrics.csv")):
        config = yaml.safe_load((metrics_csv.parent / "config_resolved.yaml").read_text(encoding="utf-8"))
        runs[config["method"]["name"]] = (metrics_csv, config)
    assert set(runs) == {"demopsd", "grpo"}
    assert runs["demopsd"][1]["method"]["reprompt"]["use_reference_answer"] is True
    assert "reprompt" not in runs["grpo"][1]["method"]

    report_dir = tmp_path / "report"
    printed = run_cli("src/report.py", str(sweep_dir), "--out", str(report_dir), timeout=600).stdout
    assert "Report on 2 run(s)" in printed

    for name in ("entropy", "reward", "leakage", "lambda"):  # leakage and λ: from the DemoPSD run alone
        png = report_dir / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == PNG_MAGIC, name
    assert (report_dir / "results.md").is_file() and (report_dir / "runs.csv").is_file()

    results = pd.read_csv(report_dir / "results.csv").set_index("method")
    assert sorted(results.index) == ["demopsd", "grpo"]
    assert set(results["dataset"]) == {"sciknoweval-biology"}
    for method, (metrics_csv, _) in runs.items():
        row = results.loc[method]
        expected = final_entropy(metrics_csv)
        assert math.isfinite(expected) and expected > 0
        assert row["seeds"] == 1 and row["entropy_final_n"] == 1
        assert row["entropy_final_mean"] == pytest.approx(expected, rel=1e-12, abs=0)
        assert math.isnan(row["entropy_final_se"])  # one seed: no standard error
    leakage = pd.read_csv(runs["demopsd"][0])["leakage/kl_teacher_student"].dropna()
    assert results.loc["demopsd", "leakage_mean_mean"] == pytest.approx(float(leakage.mean()), rel=1e-12, abs=0)
    assert math.isnan(results.loc["grpo", "leakage_mean_mean"])  # GRPO logs no leakage
