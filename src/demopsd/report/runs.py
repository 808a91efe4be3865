"""Finding and loading training runs: every run directory under some paths, and one run's metrics.

A *run directory* is any folder holding both ``metrics.csv`` (Lightning's CSVLogger) and
``config_resolved.yaml``; a Hydra multirun folder holds several. The tables (``tables``, ``leakage``, ``sweep``)
and plots (``plots``) read runs through ``Run``, ``metric_values`` and, for a value at the last evaluation,
``evaluation_values``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config_resolved.yaml"


class NoRunsError(FileNotFoundError):
    """No run directory (``metrics.csv`` + ``config_resolved.yaml``) under the searched paths."""


@dataclass(frozen=True, eq=False)
class Run:
    """One training run: where it is, what it trained, and its metrics (one row per step)."""

    path: Path
    method: str
    dataset: str
    seed: int | None
    name: str
    metrics: pd.DataFrame  # index "step" (sorted, unique); one column per logged metric
    start: Path | None = None
    """The ``src/eval.py`` evaluation that stands for the run's step 0 (:mod:`demopsd.report.start`); None when the
    run evaluated its start itself (``<path>/eval/step000000``) or not at all."""


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every run directory at any depth under ``paths`` (a path itself may be one), sorted by path.

    Raises ``FileNotFoundError`` for a path that does not exist and ``NoRunsError`` (naming the
    searched paths) when none holds a run.
    """
    roots = as_paths(paths)
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"no such file or directory: {root}")
    run_dirs = sorted({d.resolve() for root in roots for d in _run_dirs_under(root)})
    if not run_dirs:
        searched = ", ".join(str(r) for r in roots)
        raise NoRunsError(f"no run directories (a folder holding both {METRICS_FILE} and {CONFIG_FILE}) under: {searched}")
    return [load_run(d) for d in run_dirs]


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory: method, dataset, seed and run name from its config, and its metrics."""
    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    seed = OmegaConf.select(cfg, "seed", default=None)
    return Run(
        path=run_dir,
        method=str(OmegaConf.select(cfg, "method.name", default="unknown")),
        dataset=str(OmegaConf.select(cfg, "data.name", default="unknown")),
        seed=None if seed is None else int(seed),
        name=str(OmegaConf.select(cfg, "run_name", default=None) or run_dir.name),
        metrics=read_metrics(run_dir / METRICS_FILE),
    )


def read_metrics(csv_path: str | Path) -> pd.DataFrame:
    """``metrics.csv`` as one row per step: rows logged at the same step merged (last value wins)."""
    try:
        frame = pd.read_csv(csv_path)
    except pd.errors.EmptyDataError:  # the run has not logged anything yet
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    if "step" not in frame.columns:
        raise ValueError(f"{csv_path} has no 'step' column (columns: {', '.join(frame.columns)})")
    frame = frame.dropna(subset=["step"]).astype({"step": "int64"})
    return frame.groupby("step", sort=True).last()


def as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """One path or several, as a list of paths."""
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _run_dirs_under(root: Path) -> list[Path]:
    if root.is_file():
        root = root.parent
    candidates = [root / METRICS_FILE, *root.rglob(METRICS_FILE)]
    return [c.parent for c in candidates if c.is_file() and (c.parent / CONFIG_FILE).is_file()]


def metric_values(run: Run, column: str | None) -> pd.Series:
    """The run's logged values of ``column`` by step, NaN and non-numbers dropped (empty without the column)."""
    if column is None or column not in run.metrics.columns:
        return pd.Series(dtype="float64")
    return pd.to_numeric(run.metrics[column], errors="coerce").dropna()


def resolve_column(columns: Iterable[str], column: str) -> str:
    """``column`` itself, or, where it holds ``{k}``, the one of ``columns`` it matches with the largest ``k``
    (``column`` unchanged where none matches)."""
    if "{k}" not in column:
        return column
    before, after = column.split("{k}")
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    matches = {int(m[1]): c for c in columns if (m := pattern.fullmatch(c))}
    return matches[max(matches)] if matches else column


def evaluation_values(run: Run, column: str | None) -> pd.Series:
    """The run's values of the evaluation metric ``column`` (its largest ``k`` where it holds ``{k}``:
    :func:`resolve_column`) at each of its evaluations (the steps at which it logged any ``eval/`` metric), NaN at
    one that logged none: the last value is the last evaluation's, never an earlier one's (an evaluation leaves
    ``answer_top_share`` out when no answer names a letter). Other columns, those not under ``eval/``:
    :func:`metric_values`."""
    column = column if column is None else resolve_column(run.metrics.columns, column)
    if column is None or not column.startswith("eval/"):
        return metric_values(run, column)
    evaluated = run.metrics.filter(regex="^eval/").apply(pd.to_numeric, errors="coerce").notna().any(axis=1)
    return metric_values(run, column).reindex(run.metrics.index[evaluated])


def has_data(runs: Sequence[Run], columns: Iterable[str]) -> bool:
    """Whether any of ``runs`` logged a value of any of ``columns``."""
    return any(len(metric_values(r, c)) for r in runs for c in columns)
