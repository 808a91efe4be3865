"""The table of a sweep over one setting (``optim.lr``, say): one row per (method, value), from the runs' last held-out
evaluation and its change from the starting model, with a verdict on where training helps.

The change in inferable accuracy is *paired*: each held-out question's share of correct sampled answers at the last
evaluation minus its share at step 0 (the same questions, new samples), averaged over the questions, with the
standard error of that mean (``std(ddof=1) / √questions``). Pairing takes out how hard each question is, so the
change is measured far more precisely than by two accuracies' standard errors. A row *helps* where the change is at
least :data:`HELPS_AT` standard errors and at least :data:`WELL_FORMED_AT` of the answers stay well-formed.
With several seeds per row, each number is their mean (the paired standard errors combined as
``√Σse² / seeds``); the rows of one seed each are what a sweep over settings usually has.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from demopsd.report.leakage import INFERABLE, UNINFERABLE
from demopsd.report.runs import CONFIG_FILE, Run, evaluation_values, metric_values
from demopsd.report.start import SAMPLES_FILE
from demopsd.report.tables import MISSING, last_value, mean_value, method_sort_key

SWEEP_MD, SWEEP_CSV = "sweep.md", "sweep.csv"
HELPS_AT = 2.0
WELL_FORMED_AT = 0.9
DATASET = "synthetic-inferable"

COLUMNS = {
    "accuracy": "inferable acc",
    "change": "Δ acc",
    "change_se": "Δ s.e. (paired)",
    "change_in_se": "Δ / s.e.",
    "format_rate": "well-formed",
    "answer_top_share": "top answer share",
    "distinct_answers": "distinct answers@k",
    "probe_top_share": "uninferable probe top share",
    "update_norm": "mean update norm",
}
LEGEND = {
    "inferable acc": "share of correct sampled answers to the inferable held-out questions at the last evaluation",
    "Δ acc": "its paired change from the starting model (mean over questions of the change in a question's share)",
    "Δ / s.e.": f"the change in standard errors: training helps where it is ≥ {HELPS_AT:g}",
    "well-formed": "share of those answers that are well-formed (scorable)",
    "top answer share": "share of the most frequent letter among them (0.25: an even spread, 1: one letter always)",
    "distinct answers@k": "mean number of distinct letters among a question's k answers",
    "uninferable probe top share": "share of the probed uninferable held-out questions whose most probable letter "
                                   "is the most common such letter (collapse: 1)",
    "mean update norm": "mean over steps of the norm of each optimizer step's parameter change (train/update_norm)",
}


def per_question_accuracy(samples_file: Path, dataset: str = DATASET) -> dict[int, float]:
    """Question index → share of its sampled answers that are correct, for the answered questions of ``dataset``."""
    shares = {}
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["dataset"] == dataset and "samples" in record:
            shares[record["idx"]] = statistics.fmean(s["correct"] for s in record["samples"])
    return shares


def paired_change(start_file: Path, end_file: Path, dataset: str = DATASET) -> tuple[float, float, int]:
    """Mean change of the per-question accuracy from ``start_file`` to ``end_file`` (``samples.jsonl``) over the
    questions both answered, its standard error, and the number of questions."""
    start, end = per_question_accuracy(start_file, dataset), per_question_accuracy(end_file, dataset)
    changes = [end[idx] - start[idx] for idx in sorted(start.keys() & end.keys())]
    if len(changes) < 2:
        raise ValueError(f"{start_file} and {end_file} share {len(changes)} answered {dataset} questions; "
                         "a paired change needs two or more")
    return statistics.fmean(changes), statistics.stdev(changes) / math.sqrt(len(changes)), len(changes)


def evaluation_samples(run_dir: Path, step: int) -> Path:
    """Where a training run in ``run_dir`` wrote the held-out samples of its evaluation at ``step``."""
    return run_dir / "eval" / f"step{step:06d}" / SAMPLES_FILE


def samples_at(run: Run, step: int) -> Path:
    """Where the run's held-out samples of ``step`` are (step 0: those of its starting evaluation, if it has one)."""
    if step == 0 and run.start is not None:
        return run.start / SAMPLES_FILE
    return evaluation_samples(run.path, step)


def sweep_row(run: Run, key: str) -> dict[str, object]:
    """One run's numbers for the sweep table; ``key`` is the swept setting, read from the run's config."""
    accuracy = evaluation_values(run, INFERABLE + "acc_avg@{k}")
    last = int(accuracy.index[-1])
    change, change_se, questions = paired_change(samples_at(run, 0), samples_at(run, last))
    return {
        "method": run.method,
        key: setting_of(run, key),
        "seed": run.seed,
        "step": last,
        "start_accuracy": float(accuracy.iloc[0]),
        "accuracy": float(accuracy.iloc[-1]),
        "change": change,
        "change_se": change_se,
        "questions": questions,
        "format_rate": last_value(evaluation_values(run, INFERABLE + "format_rate")),
        "answer_top_share": last_value(evaluation_values(run, INFERABLE + "answer_top_share")),
        "distinct_answers": last_value(evaluation_values(run, INFERABLE + "distinct_answers@{k}")),
        "probe_top_share": last_value(evaluation_values(run, UNINFERABLE + "probe_top_share")),
        "update_norm": mean_value(metric_values(run, "train/update_norm")),
        "run": run.path.name,
    }


def sweep_table(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    """One row per (method, value of ``key``) of the per-run ``rows`` (:func:`sweep_row`): the mean over its seeds,
    ``seeds`` their number and ``helps`` the verdict (see the module doc)."""
    grouped = rows.groupby(["method", key], sort=False)
    table = grouped[[*COLUMNS.keys() - {"change_se", "change_in_se"}, "start_accuracy"]].mean()
    table["change_se"] = grouped["change_se"].apply(lambda se: math.sqrt((se ** 2).sum()) / len(se))
    table["change_in_se"] = table["change"] / table["change_se"]
    table["seeds"] = grouped.size()
    table["helps"] = (table["change_in_se"] >= HELPS_AT) & (table["format_rate"] >= WELL_FORMED_AT)
    order = sorted(table.index, key=lambda index: (method_sort_key(index[0]), index[1]))
    return table.loc[order].reset_index()


def setting_of(run: Run, key: str) -> object:
    """The value of the setting ``key`` (``optim.lr``) in the run's resolved config."""
    return OmegaConf.select(OmegaConf.load(run.path / CONFIG_FILE), key)


def labelled_by_setting(runs: Sequence[Run], key: str) -> list[Run]:
    """The runs, each method named with its value of ``key`` (``grpo optim.lr=1e-05``), so that tables and plots that
    group runs by method keep the sweep's settings apart."""
    return [dataclasses.replace(run, method=f"{run.method} {key}={setting_of(run, key):g}") for run in runs]


def write_sweep(runs: Sequence[Run], out_dir: Path, key: str) -> tuple[Path, Path]:
    """``sweep.md`` (the table, its legend and the verdict) and ``sweep.csv`` (one row per run) in ``out_dir``."""
    rows = pd.DataFrame([sweep_row(run, key) for run in runs])
    table = sweep_table(rows, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out_dir / SWEEP_CSV, index=False)
    starts = ", ".join(f"{s:.3f}" for s in sorted(set(rows["start_accuracy"].round(3))))
    helping = [f"{row['method']} at {key}={row[key]:g}" for _, row in table[table["helps"]].iterrows()]
    lines = [
        f"# Sweep over `{key}`",
        "",
        f"{len(rows)} runs ({', '.join(f'seed {s}' for s in sorted(set(rows['seed'])))}); the starting model's "
        f"inferable accuracy {starts}; {'/'.join(map(str, sorted(set(rows['questions']))))} questions in each paired "
        "change.",
        "",
        f"| method | {key} | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
        *(f"| {row['method']} | {row[key]:g} | " + " | ".join(_cell(row[name]) for name in COLUMNS) + " |"
          for _, row in table.iterrows()),
        "",
        *(f"- **{header}**: {text}" for header, text in LEGEND.items()),
        "",
        f"Training helps (Δ ≥ {HELPS_AT:g} paired s.e., ≥ {WELL_FORMED_AT:.0%} well-formed): "
        + (", ".join(helping) if helping else "in none of these settings") + ".",
    ]
    (out_dir / SWEEP_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir / SWEEP_MD, out_dir / SWEEP_CSV


def _cell(value: float) -> str:
    return MISSING if pd.isna(value) else f"{value:.3f}"
