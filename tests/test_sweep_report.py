"""A sweep's report: runs that skipped their step-0 evaluation take it from the starting model's evaluation made once
by ``src/eval.py``, and ``sweep.md`` gives one row per (method, setting) with the paired change in accuracy."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from demopsd.config.settings import EvalConfig
from demopsd.report.plots import method_colours, write_report
from demopsd.report.runs import find_runs
from demopsd.report.start import NoFittingStartError, find_starting_evaluations, with_starting_model
from demopsd.report.leakage import leakage_scalars
from demopsd.report.sweep import paired_change, sweep_row
from tests.helpers import REPO_ROOT

INFERABLE, UNINFERABLE = "synthetic-inferable", "synthetic-uninferable"
QUESTIONS = 16
START_CORRECT = [i % 4 == 0 for i in range(QUESTIONS * 4)]  # a quarter of the answers, one per question


def settings(seed: int = 0, **changes) -> dict:
    """A resolved config of the synthetic task with seed ``seed``, ``changes`` (dotted keys) applied."""
    config = OmegaConf.create({
        "seed": seed, "run_name": f"seed{seed}", "data": {"name": "synthetic-mixed", "generator_seed": seed},
        "model": {"name_or_path": "warmed"}, "eval": dataclasses.asdict(EvalConfig(k=4, max_examples=QUESTIONS)),
    })
    for key, value in changes.items():
        OmegaConf.update(config, key, value)
    return OmegaConf.to_container(config)


def samples(correct: list[bool], letters: str = "ABCD") -> list[dict]:
    """Records of the inferable questions, 4 answers each (``correct`` in order), and one probed uninferable one."""
    records = []
    for q in range(QUESTIONS):
        answers = correct[4 * q: 4 * q + 4]
        records.append({"dataset": INFERABLE, "idx": q, "answer": "A", "samples": [
            {"correct": c, "predicted": "A" if c else letters[1 + j % 3], "well_formed": True} for j, c in
            enumerate(answers)]})
    records.append({"dataset": UNINFERABLE, "idx": 0, "answer": "B", "letter_probs": {"A": 0.7, "B": 0.3}})
    return records


def evaluation_metrics(correct: list[bool], letter_entropy: float, format_rate: float = 1.0) -> dict[str, float]:
    return {f"eval/{INFERABLE}/acc_avg@4": float(np.mean(correct)), f"eval/{INFERABLE}/format_rate": format_rate,
            f"eval/{INFERABLE}/answer_top_share": 0.5, f"eval/{INFERABLE}/distinct_answers@4": 2.0,
            f"eval/{UNINFERABLE}/letter_entropy": letter_entropy, f"eval/{UNINFERABLE}/probe_top_share": 0.4}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_start(directory: Path, seed: int = 0, **changes) -> Path:
    """What ``src/eval.py`` writes: its resolved config, ``summary.json`` and ``samples.jsonl``."""
    directory.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(settings(seed, **changes)), directory / "config_resolved.yaml")
    summary = {"evaluated": "warmed", "metrics": evaluation_metrics(START_CORRECT, letter_entropy=1.3)}
    (directory / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    write_jsonl(directory / "samples.jsonl", samples(START_CORRECT))
    return directory


def write_sweep_run(directory: Path, method: str, lr: float, correct: list[bool], format_rate: float = 1.0,
                    seed: int = 0, steps: int = 4) -> Path:
    """A training run that skipped its step-0 evaluation: train metrics every step, an evaluation at the last."""
    directory.mkdir(parents=True)
    config = settings(seed, **{"optim.lr": lr, "method.name": method})
    OmegaConf.save(OmegaConf.create(config), directory / "config_resolved.yaml")
    rows = [{"step": step, "train/update_norm": 0.1 * (step + 1)} for step in range(steps)]
    rows.append({"step": steps, **evaluation_metrics(correct, letter_entropy=1.0, format_rate=format_rate)})
    pd.DataFrame(rows).to_csv(directory / "metrics.csv", index=False)
    write_jsonl(directory / "eval" / f"step{steps:06d}" / "samples.jsonl", samples(correct))
    return directory


def improved(questions: int) -> list[bool]:
    """The starting answers with every answer of the first ``questions`` questions made correct."""
    return [True if i < 4 * questions else c for i, c in enumerate(START_CORRECT)]


def test_a_run_that_skipped_step_0_takes_the_starting_evaluation_and_its_changes(tmp_path):
    start = write_start(tmp_path / "start")
    write_sweep_run(tmp_path / "runs" / "a", "grpo", 1e-5, improved(8))
    [run] = with_starting_model(find_runs(tmp_path / "runs"), find_starting_evaluations(tmp_path / "start"))
    assert run.start == start.resolve()
    at_start, at_end = run.metrics.loc[0], run.metrics.loc[4]
    assert at_start[f"eval/{INFERABLE}/acc_avg@4"] == 0.25 and at_start["train/update_norm"] == pytest.approx(0.1)
    assert at_end[f"eval/{INFERABLE}/acc_avg@4"] == pytest.approx(0.25 + 0.75 * 8 / 16)
    assert at_start[f"eval/{UNINFERABLE}/letter_entropy_change"] == 0.0
    assert at_end[f"eval/{UNINFERABLE}/letter_entropy_change"] == pytest.approx(1.0 - 1.3)
    assert f"eval/{INFERABLE}/acc_avg@4_change" not in run.metrics.columns  # only what a run logs as changes
    assert run.metrics.loc[1:3, f"eval/{UNINFERABLE}/letter_entropy_change"].isna().all()


@pytest.mark.parametrize("change, named", [({"seed": 1}, "seed"), ({"data.generator_seed": 5}, "data"),
                                           ({"eval.probe_examples": 7}, "eval.probe_examples")])
def test_an_evaluation_of_other_settings_does_not_stand_for_the_start(tmp_path, change, named):
    write_start(tmp_path / "start", **change)
    write_sweep_run(tmp_path / "runs" / "a", "grpo", 1e-5, improved(8))
    with pytest.raises(NoFittingStartError, match=rf"runs/a was not evaluated at step 0.*{named}"):
        with_starting_model(find_runs(tmp_path / "runs"), find_starting_evaluations(tmp_path / "start"))


def test_a_run_that_evaluated_its_start_keeps_its_own(tmp_path):
    write_start(tmp_path / "start")
    run_dir = write_sweep_run(tmp_path / "runs" / "a", "grpo", 1e-5, improved(8))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    metrics.loc[0, f"eval/{INFERABLE}/acc_avg@4"] = 0.5
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    [run] = find_runs(tmp_path / "runs")
    [kept] = with_starting_model([run], find_starting_evaluations(tmp_path / "start"))
    assert kept is run and kept.start is None


def test_a_metric_the_last_evaluation_left_out_is_missing_not_the_starts(tmp_path):
    """An evaluation in which no answer names a letter logs no top answer share: the run's last value is missing,
    not the starting model's 0.5, in the sweep's row and the leakage tables; what the evaluation logged stays."""
    write_start(tmp_path / "start")
    run_dir = write_sweep_run(tmp_path / "runs" / "a", "grpo", 1e-5, improved(8))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    metrics.loc[metrics["step"] == 4, f"eval/{INFERABLE}/answer_top_share"] = np.nan
    metrics.to_csv(run_dir / "metrics.csv", index=False)
    [run] = with_starting_model(find_runs(tmp_path / "runs"), find_starting_evaluations(tmp_path / "start"))
    assert run.metrics.loc[0, f"eval/{INFERABLE}/answer_top_share"] == 0.5
    row, scalars = sweep_row(run, "optim.lr"), leakage_scalars(run)
    assert math.isnan(row["answer_top_share"]) and math.isnan(scalars["inferable_answer_top_share"])
    assert row["distinct_answers"] == 2.0 and row["probe_top_share"] == 0.4 and row["format_rate"] == 1.0
    assert row["update_norm"] == pytest.approx(0.25)  # the training metrics of every step, not only evaluations'


def test_paired_change_equals_a_per_question_recomputation(tmp_path):
    rng = np.random.default_rng(0)
    start, end = rng.random(QUESTIONS * 4) < 0.3, rng.random(QUESTIONS * 4) < 0.6
    write_jsonl(tmp_path / "start.jsonl", samples(list(map(bool, start))))
    write_jsonl(tmp_path / "end.jsonl", samples(list(map(bool, end))))
    change, se, questions = paired_change(tmp_path / "start.jsonl", tmp_path / "end.jsonl")
    per_question = end.reshape(QUESTIONS, 4).mean(1) - start.reshape(QUESTIONS, 4).mean(1)
    assert questions == QUESTIONS
    assert change == pytest.approx(per_question.mean())
    assert se == pytest.approx(per_question.std(ddof=1) / math.sqrt(QUESTIONS))


def test_the_sweep_table_says_where_training_helps(tmp_path):
    write_start(tmp_path / "start")
    write_sweep_run(tmp_path / "runs" / "grpo_small", "grpo", 1e-6, START_CORRECT)
    helps = improved(12)
    helps[50] = True  # one more correct answer: the per-question changes differ, so their s.e. is above 0
    write_sweep_run(tmp_path / "runs" / "grpo_mid", "grpo", 1e-5, helps)
    write_sweep_run(tmp_path / "runs" / "grpo_large", "grpo", 1e-4, improved(12), format_rate=0.5)
    write_sweep_run(tmp_path / "runs" / "demopsd_mid", "demopsd", 1e-5, improved(1))
    files = write_report(tmp_path / "runs", tmp_path / "out", start=tmp_path / "start", sweep="optim.lr")
    table = files.sweep_md.read_text()
    rows = {tuple(cells[1:3]): cells[3:] for line in table.splitlines()
            if (cells := [c.strip() for c in line.split("|")])[1:2] in (["grpo"], ["demopsd"])}
    assert list(rows) == [("demopsd", "1e-05"), ("grpo", "1e-06"), ("grpo", "1e-05"), ("grpo", "0.0001")]
    assert rows[("grpo", "1e-06")][1] == "0.000" and rows[("grpo", "1e-05")][0] == f"{(12 * 4 + 4 + 1) / 64:.3f}"
    verdict = "Training helps (Δ ≥ 2 paired s.e., ≥ 90% well-formed): grpo at optim.lr=1e-05."
    assert table.rstrip().endswith(verdict)
    per_run = pd.read_csv(files.sweep_csv)
    assert sorted(per_run["optim.lr"]) == [1e-6, 1e-5, 1e-5, 1e-4] and set(per_run["questions"]) == {QUESTIONS}
    results = files.table_md.read_text()
    assert "grpo optim.lr=1e-05" in results and "grpo optim.lr=0.0001" in results  # settings kept apart


def test_the_report_command_names_a_start_that_does_not_fit(tmp_path):
    write_start(tmp_path / "start", seed=3)
    write_sweep_run(tmp_path / "runs" / "a", "grpo", 1e-5, improved(8))
    command = [sys.executable, "src/report.py", str(tmp_path / "runs"), "--start", str(tmp_path / "start"),
               "--sweep", "optim.lr", "--out", str(tmp_path / "out")]
    failed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "seed: 3 in" in failed.stderr and "0 in the run" in failed.stderr
    write_start(tmp_path / "start0")
    command[command.index(str(tmp_path / "start"))] = str(tmp_path / "start0")
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sweep table: sweep.md, sweep.csv" in done.stdout and (tmp_path / "out" / "sweep.md").is_file()


def test_every_setting_of_a_sweep_has_its_own_shade_of_its_methods_colour():
    """Eight sweep labels (more than the palette for other methods holds): eight colours, each a shade of its
    method's (the same hue), lighter for a smaller value, the largest value the method's own colour."""
    from matplotlib.colors import rgb_to_hsv, to_rgb

    values = ("0.3", "0.01", "0.1", "0.03")
    labels = [f"{method} optim.lr={value}" for method in ("grpo", "demopsd") for value in values]
    colours = method_colours(label for label in [*labels, "demopsd_placebo"])  # read once, as the report passes them
    assert len({colours[label] for label in labels}) == len(labels)
    for method in ("grpo", "demopsd"):
        ordered = [colours[f"{method} optim.lr={value}"] for value in sorted(values, key=float)]
        hues = [rgb_to_hsv(to_rgb(colour))[0] for colour in ordered]
        assert max(hues) - min(hues) < 0.01  # one hue
        lightness = [sum(to_rgb(colour)) for colour in ordered]
        assert lightness == sorted(lightness, reverse=True) and ordered[-1] == colours[method]
    assert colours["demopsd_placebo"] not in {colours[label] for label in labels}
