"""Results tables over runs: per-seed scalars, their mean ± standard error per (dataset, method), Markdown.

Each number is computed per seed (per run) first, then aggregated over the seeds of a (dataset, method)
by ``mean_se``: the standard error is ``std(ddof=1) / sqrt(n)``; with one seed there is none (the table
shows ``0.412 ± —``). ``write_results`` writes ``results.md`` / ``results.csv`` (one row per (dataset,
method): best / final accuracy, final entropy, mean leakage) and ``runs.csv`` (the per-seed scalars, one
row per run). ``leakage`` builds its table from the same pieces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from demopsd.report.runs import Run, metric_values

METHOD_ORDER = ("demopsd", "sdpo", "opsd", "grpo")
METHOD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")  # demopsd, sdpo, opsd, grpo
EVAL_ACCURACY = re.compile(r"^eval/(?P<dataset>.+)/(?P<metric>acc_avg@(?P<k>\d+))$")
MISSING = "—"
MEAN_SE_NOTE = ("Mean ± standard error over seeds (s.e. = std(ddof=1) / √n); each number is first computed "
                f"per seed. `± {MISSING}`: a single seed; `{MISSING}`: no run has the metric.")

# Per-seed scalars of the results table: key -> column header.
QUANTITIES = {
    "indomain_best": "in-domain acc (best)",
    "indomain_final": "in-domain acc (final)",
    "gpqa_best": "GPQA acc (best)",
    "gpqa_final": "GPQA acc (final)",
    "entropy_final": "final entropy",
    "leakage_mean": "mean KL(teacher ‖ student)",
}


def method_sort_key(method: str) -> tuple[int, str]:
    """The fixed order demopsd, sdpo, opsd, grpo, then other methods alphabetically."""
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


# --------------------------------------------------------------------------- per-seed scalars


def first_value(values: pd.Series) -> float:
    """The first logged value, NaN if none."""
    return float(values.iloc[0]) if len(values) else math.nan


def last_value(values: pd.Series) -> float:
    """The last logged value, NaN if none."""
    return float(values.iloc[-1]) if len(values) else math.nan


def max_value(values: pd.Series) -> float:
    """The largest logged value, NaN if none."""
    return float(values.max()) if len(values) else math.nan


def change_value(values: pd.Series) -> float:
    """The last logged value minus the first, NaN if none."""
    return last_value(values) - first_value(values)


def mean_value(values: pd.Series) -> float:
    """The mean of the logged values, NaN if none."""
    return float(values.mean()) if len(values) else math.nan


def eval_accuracy_columns(columns: Iterable[str]) -> dict[str, str]:
    """``{eval dataset: column}`` for the ``eval/<dataset>/acc_avg@k`` columns, the largest ``k`` per dataset."""
    best: dict[str, tuple[int, str]] = {}
    for column in columns:
        match = EVAL_ACCURACY.match(column)
        if match:
            k = int(match["k"])
            if match["dataset"] not in best or k > best[match["dataset"]][0]:
                best[match["dataset"]] = (k, column)
    return {dataset: column for dataset, (_, column) in best.items()}


def _eval_columns_of(run: Run) -> tuple[str | None, str | None]:
    """The run's in-domain eval column (its own dataset) and its GPQA column, or None.

    GPQA is the first ``gpqa*`` eval dataset in alphabetical order (``gpqa-diamond`` when present).
    """
    columns = {d: c for d, c in eval_accuracy_columns(run.metrics.columns).items() if len(metric_values(run, c))}
    gpqa = sorted(d for d in columns if d.startswith("gpqa"))
    return columns.get(run.dataset), (columns[gpqa[0]] if gpqa else None)


def run_scalars(run: Run) -> dict[str, object]:
    """The per-seed numbers of the results table for one run (NaN where the run lacks the metric)."""
    indomain, gpqa = _eval_columns_of(run)
    return {
        "run": run.name,
        "path": str(run.path),
        "dataset": run.dataset,
        "method": run.method,
        "seed": run.seed,
        "indomain_metric": indomain,
        "gpqa_metric": gpqa,
        "indomain_best": max_value(metric_values(run, indomain)),
        "indomain_final": last_value(metric_values(run, indomain)),
        "gpqa_best": max_value(metric_values(run, gpqa)),
        "gpqa_final": last_value(metric_values(run, gpqa)),
        "entropy_final": last_value(metric_values(run, "train/entropy")),
        "leakage_mean": mean_value(metric_values(run, "leakage/kl_teacher_student")),
    }


def per_run(runs: Sequence[Run]) -> pd.DataFrame:
    """``run_scalars`` of every run, one row per run."""
    return pd.DataFrame([run_scalars(r) for r in runs])


# --------------------------------------------------------------------------- aggregation over seeds


def mean_se(values: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, standard error, n)`` over the non-NaN values; s.e. = std(ddof=1)/sqrt(n), NaN for n < 2."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(array)
    if n == 0:
        return math.nan, math.nan, 0
    se = float(array.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(array.mean()), se, n


def summarize(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (dataset, method): ``seeds`` and, per quantity, ``<q>_mean``, ``<q>_se``, ``<q>_n``.

    Each quantity is computed per seed first (``run_scalars``), then aggregated with ``mean_se``.
    Rows are sorted by dataset, then in the fixed method order.
    """
    return aggregate(per_run(runs), QUANTITIES)


def aggregate(scalars: pd.DataFrame, quantities: Iterable[str]) -> pd.DataFrame:
    """Per-seed ``scalars`` (one row per run) as one row per (dataset, method), each quantity by ``mean_se``.

    Columns ``dataset``, ``method``, ``seeds`` and ``<q>_mean``, ``<q>_se``, ``<q>_n`` per quantity; rows
    sorted by dataset, then in the fixed method order.
    """
    quantities = list(quantities)
    columns = ["dataset", "method", "seeds", *(f"{q}_{s}" for q in quantities for s in ("mean", "se", "n"))]
    if scalars.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (dataset, method), group in scalars.groupby(["dataset", "method"], sort=False):
        row: dict[str, object] = {"dataset": dataset, "method": method, "seeds": len(group)}
        for q in quantities:
            row[f"{q}_mean"], row[f"{q}_se"], row[f"{q}_n"] = mean_se(group[q])
        rows.append(row)
    table = pd.DataFrame(rows, columns=columns)
    order = sorted(range(len(table)), key=lambda i: (table["dataset"][i], method_sort_key(table["method"][i])))
    return table.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------- Markdown


def format_mean_se(mean: float, se: float) -> str:
    """``0.412 ± 0.013``; ``0.412 ± —`` without an s.e. (one seed); ``—`` without a value.

    Three decimals, more for small magnitudes so that three significant digits remain.
    """
    if mean is None or math.isnan(mean):
        return MISSING
    decimals = 3 if mean == 0 else min(8, max(3, 2 - math.floor(math.log10(abs(mean)))))
    spread = MISSING if se is None or math.isnan(se) else f"{se:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {spread}"


def markdown_table(summary: pd.DataFrame, headers: Mapping[str, str]) -> list[str]:
    """The lines of an ``aggregate`` table in Markdown, one column per ``{quantity: header}``.

    Each cell is ``mean ± s.e.``; a cell from fewer seeds than its row says ``(n=k)``.
    """
    header = ["dataset", "method", "seeds", *headers.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for _, row in summary.iterrows():
        cells = [str(row["dataset"]), str(row["method"]), str(row["seeds"]), *(_cell(row, q) for q in headers)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cell(row: pd.Series, quantity: str) -> str:
    """``mean ± s.e.`` of ``quantity`` in an ``aggregate`` row; ``(n=k)`` when fewer seeds than the row's have it."""
    cell, n = format_mean_se(row[f"{quantity}_mean"], row[f"{quantity}_se"]), int(row[f"{quantity}_n"])
    return cell if n in (0, row["seeds"]) else f"{cell} (n={n})"


def markdown_transposed(summary: pd.DataFrame, headers: Mapping[str, str]) -> list[str]:
    """The lines of an ``aggregate`` table in Markdown with one row per ``{quantity: header}`` and one column per
    row of ``summary`` (its method, or ``dataset · method`` where there are several datasets): for many quantities.
    Each cell is as :func:`markdown_table`'s.
    """
    several = summary["dataset"].nunique() > 1
    columns = [f"{row['dataset']} · {row['method']}" if several else str(row["method"])
               for _, row in summary.iterrows()]
    lines = ["| quantity | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns),
             "| seeds | " + " | ".join(str(seeds) for seeds in summary["seeds"]) + " |"]
    for q, header in headers.items():
        lines.append(f"| {header} | " + " | ".join(_cell(row, q) for _, row in summary.iterrows()) + " |")
    return lines


def results_markdown(summary: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The summary as a Markdown table; a cell from fewer seeds than its row says ``(n=k)``."""
    intro = ["# Results", "", MEAN_SE_NOTE, ""]
    lines = markdown_table(summary, QUANTITIES)
    return "\n".join(intro + lines + ([""] + [f"- {n}" for n in notes] if notes else []) + [""])


def _table_notes(scalars: pd.DataFrame) -> list[str]:
    """Which eval columns the accuracy numbers come from, and what each quantity means."""
    notes = []
    for kind in ("indomain_metric", "gpqa_metric"):
        used = sorted({c for c in scalars[kind] if isinstance(c, str)}) if kind in scalars else []
        label = "in-domain" if kind == "indomain_metric" else "GPQA"
        notes.append(f"{label} accuracy from: {', '.join(f'`{c}`' for c in used) if used else 'no eval column'}")
    notes.append("best = maximum over eval steps, final = last eval step; final entropy = last logged `train/entropy`; "
                 "mean KL = mean over steps of `leakage/kl_teacher_student`")
    return notes


def write_results(runs: Sequence[Run], out: Path) -> tuple[Path, Path, Path]:
    """``results.md``, ``results.csv`` (``summarize``) and ``runs.csv`` (``per_run``) in ``out``, returned in that
    order."""
    scalars = per_run(runs)
    summary = aggregate(scalars, QUANTITIES)
    table_md, table_csv, runs_csv = out / "results.md", out / "results.csv", out / "runs.csv"
    summary.to_csv(table_csv, index=False)
    scalars.to_csv(runs_csv, index=False)
    table_md.write_text(results_markdown(summary, _table_notes(scalars)), encoding="utf-8")
    return table_md, table_csv, runs_csv
