"""The starting model's evaluation, made once by ``src/eval.py``, as step 0 of the training runs that skipped it.

Runs that share a seed start from the same weights, questions and sampling seeds, so a sweep's runs may skip their
step-0 evaluation (``eval.at_start=false``) while ``src/eval.py`` with the same settings makes it once
(``experiment=lr_sweep``). :func:`with_starting_model` gives each such run that evaluation's metrics at step 0 and
the ``<metric>_change`` columns the run would have logged against it, so every table and plot reads the run as if
it had evaluated its start itself. An evaluation stands for a run's start only when their seed, data, model and
evaluation settings are equal; otherwise the report stops and names the first difference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from demopsd.config.settings import EvalConfig
from demopsd.evaluation.metrics import changes_from
from demopsd.report.runs import CONFIG_FILE, METRICS_FILE, Run, as_paths

SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.jsonl"
COMPARED_KEYS = ("seed", "data", "model", *(f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)))
"""What must be equal for an evaluation to stand for a run's step 0."""


class NoFittingStartError(ValueError):
    """A run skipped its step-0 evaluation and none of the starting-model evaluations given fits it."""


@dataclass(frozen=True)
class StartingEvaluation:
    """One ``src/eval.py`` output directory: its settings and its metrics (``eval/<dataset>/<metric>``)."""

    path: Path
    config: DictConfig
    metrics: dict[str, float]


def find_starting_evaluations(paths: str | Path | Iterable[str | Path]) -> list[StartingEvaluation]:
    """Every ``src/eval.py`` output directory (``summary.json`` and ``config_resolved.yaml``, no ``metrics.csv``) at
    any depth under ``paths``, sorted by path; ``FileNotFoundError`` for a path that does not exist or holds none."""
    roots = as_paths(paths)
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"no such file or directory: {root}")
    found = sorted({summary.parent.resolve() for root in roots for summary in [root / SUMMARY_FILE,
                                                                                *root.rglob(SUMMARY_FILE)]
                    if summary.is_file() and (summary.parent / CONFIG_FILE).is_file()
                    and not (summary.parent / METRICS_FILE).exists()})
    if not found:
        raise FileNotFoundError(f"no evaluation directories (a folder holding {SUMMARY_FILE} and {CONFIG_FILE}, "
                                f"written by src/eval.py) under: {', '.join(map(str, roots))}")
    return [StartingEvaluation(d, OmegaConf.load(d / CONFIG_FILE),
                               json.loads((d / SUMMARY_FILE).read_text(encoding="utf-8"))["metrics"]) for d in found]


def first_difference(start: StartingEvaluation, run_config: DictConfig) -> str | None:
    """The first of :data:`COMPARED_KEYS` on which the evaluation's settings and the run's differ, with both
    values; None when they agree on all."""
    for key in COMPARED_KEYS:
        here = OmegaConf.select(start.config, key, default=None)
        there = OmegaConf.select(run_config, key, default=None)
        here, there = (OmegaConf.to_container(v) if isinstance(v, DictConfig) else v for v in (here, there))
        if here != there:
            return f"{key}: {here!r} in {start.path}, {there!r} in the run"
    return None


def evaluated_at_start(run: Run) -> bool:
    """Whether the run logged a held-out evaluation at step 0."""
    if 0 not in run.metrics.index:
        return False
    return bool(run.metrics.loc[0, [c for c in run.metrics.columns if c.startswith("eval/")]].notna().any())


def with_starting_model(runs: Sequence[Run], starts: Sequence[StartingEvaluation]) -> list[Run]:
    """``runs``, each that did not evaluate its start given the fitting one of ``starts`` as step 0 (and ``Run.start``
    its directory); if none fits, :class:`NoFittingStartError` names the run and why each evaluation does not."""
    completed = []
    for run in runs:
        if evaluated_at_start(run):
            completed.append(run)
            continue
        config = OmegaConf.load(run.path / CONFIG_FILE)
        reasons = [first_difference(start, config) for start in starts]
        fitting = [start for start, reason in zip(starts, reasons) if reason is None]
        if not fitting:
            raise NoFittingStartError(f"run {run.path} was not evaluated at step 0 and no starting-model evaluation "
                                      "fits it: " + "; ".join(reasons or ["none was given"]))
        completed.append(dataclasses.replace(run, metrics=metrics_from(fitting[0], run.metrics),
                                             start=fitting[0].path))
    return completed


def metrics_from(start: StartingEvaluation, metrics: pd.DataFrame) -> pd.DataFrame:
    """A run's ``metrics`` (one row per step) with the start's metrics at step 0 and, at every step that evaluated,
    the changes from them that the run's own step-0 evaluation would have logged."""
    rows = {0: {**start.metrics, **changes_from(start.metrics, start.metrics)}}
    for step, row in metrics.iterrows():
        evaluated = {name: float(value) for name, value in row.items() if name.startswith("eval/") and pd.notna(value)}
        rows[int(step)] = {**rows.get(int(step), {}), **changes_from(start.metrics, evaluated)}
    added = pd.DataFrame.from_dict(rows, orient="index").rename_axis("step")
    return metrics.combine_first(added).sort_index()
