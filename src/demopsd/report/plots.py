"""Plots over runs (curves per method, seeds as a band) and ``write_report``, which writes every file of a report.

``write_report`` finds every run under the given paths (``runs``) and writes, into one output folder:

* ``<quantity>.png``: entropy, leakage, λ, reward and every ``eval/<dataset>/acc_avg@k`` column
  over training steps; one colour per method, seeds aggregated as mean ± standard error band,
  one row of panels per training dataset; long per-step curves are smoothed (rolling mean over
  about 1/30 of the run, the raw mean drawn faintly behind), eval points are not;
* ``results.md`` / ``results.csv`` and ``runs.csv``: the results table and its per-seed scalars (``tables``);
* for runs evaluated on the held-out synthetic sets: ``leakage.md`` / ``leakage.csv`` and ``leakage_runs.csv``
  (``leakage``), ``heldout_probe.png``, the uninferable confidence and overconfidence changes over steps, and
  ``heldout_collapse.png`` / ``heldout_diversity.png``, the top answer share and the distinct answers@k per kind.

The standard error is ``std(ddof=1) / sqrt(n)`` over seeds; with one seed the plot has no band.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from demopsd.report.leakage import KINDS, LEAKAGE_QUANTITIES, write_leakage
from demopsd.report.runs import Run, as_paths, find_runs, has_data, metric_values, resolve_column
from demopsd.report.start import find_starting_evaluations, with_starting_model
from demopsd.report.sweep import labelled_by_setting, write_sweep
from demopsd.report.tables import EVAL_ACCURACY, METHOD_COLOURS, METHOD_ORDER, method_sort_key, write_results

log = logging.getLogger(__name__)

OTHER_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DPI = 120


@dataclass(frozen=True)
class CurveSpec:
    """One PNG: a quantity over steps, one panel per column (side by side) and per dataset (rows)."""

    key: str
    title: str
    ylabel: str
    columns: tuple[str, ...]
    panel_titles: tuple[str, ...] = ()
    eval_points: bool = False  # sparse points: markers, no interpolation across gaps


TRAIN_CURVES = (
    CurveSpec("entropy", "Policy entropy", "entropy (nats / token)", ("train/entropy",)),
    CurveSpec(
        "leakage",
        "Leakage: KL to the student",
        "KL (nats / token)",
        ("leakage/kl_teacher_student", "leakage/kl_target_student"),
        ("KL(teacher ‖ student)", "KL(target ‖ student)"),
    ),
    CurveSpec("lambda", "Mixing weight λ", "mean λ over distilled tokens", ("distill/lambda_mean",)),
    CurveSpec("reward", "Training reward", "mean reward", ("train/reward_mean",)),
)


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """A colour per method: fixed for the four known methods, the rest in alphabetical order. A sweep's runs of a
    known method (``grpo optim.lr=0.1``: :func:`~demopsd.report.sweep.labelled_by_setting`) take shades of its
    colour, lightest for the smallest value, so that every setting has its own and each method stays one hue."""
    methods, colours = set(methods), dict(zip(METHOD_ORDER, METHOD_COLOURS))
    swept: dict[str, list[str]] = {}
    for method in methods - set(METHOD_ORDER):
        if method.split(" ")[0] in colours:
            swept.setdefault(method.split(" ")[0], []).append(method)
    for base, labels in swept.items():
        labels.sort(key=_setting_value)
        for i, label in enumerate(labels):
            colours[label] = _shade(colours[base], 0.35 + 0.65 * (i + 1) / len(labels))
    others = sorted(methods - colours.keys())
    colours.update({m: OTHER_COLOURS[i % len(OTHER_COLOURS)] for i, m in enumerate(others)})
    return colours


def _setting_value(label: str) -> tuple[float, str]:
    """``grpo optim.lr=0.1`` → (0.1, label): numbers in numeric order (the label alone where none is)."""
    try:
        return float(label.rsplit("=", 1)[1]), label
    except (IndexError, ValueError):
        return math.inf, label


def _shade(colour: str, strength: float) -> str:
    """``colour`` mixed with white: ``strength`` 1 is the colour itself, 0 white."""
    return to_hex([1 - strength * (1 - channel) for channel in to_rgb(colour)])


# --------------------------------------------------------------------------- curves


def seed_band(runs: Sequence[Run], column: str, interpolate: bool = True, window: int = 1) -> pd.DataFrame:
    """Mean, s.e. and seed count per step of ``column`` over ``runs`` (columns ``mean``, ``se``, ``n``).

    With ``interpolate``, gaps *inside* a run's curve (NaN steps) are filled linearly before
    averaging, so that a seed missing one step does not make the mean jump; steps past a run's
    end are not filled. With ``window > 1`` each run is first smoothed by a centred rolling mean
    over that many logged steps. Steps with no value in any run are dropped.
    """
    series = [_run_series(run, column, interpolate, window).rename(run.name) for run in runs]
    series = [s for s in series if len(s)]
    if not series:
        return pd.DataFrame(columns=["mean", "se", "n"], index=pd.Index([], name="step"))
    frame = pd.concat(series, axis=1).sort_index()
    n = frame.count(axis=1)
    se = (frame.std(axis=1, ddof=1) / np.sqrt(n)).where(n > 1)
    return pd.DataFrame({"mean": frame.mean(axis=1), "se": se, "n": n})


def _run_series(run: Run, column: str, interpolate: bool, window: int) -> pd.Series:
    if column not in run.metrics.columns:
        return pd.Series(dtype="float64")
    values = pd.to_numeric(run.metrics[column], errors="coerce")
    if interpolate and values.notna().sum() > 1:
        values = values.interpolate(method="index", limit_area="inside")
    values = values.dropna()
    return values.rolling(window, center=True, min_periods=1).mean() if window > 1 else values


def smoothing_window(runs: Sequence[Run], columns: Iterable[str], points: int = 30) -> int:
    """Rolling-mean window for dense per-step curves: about ``points`` independent points per curve."""
    longest = max((len(metric_values(r, c)) for r in runs for c in columns), default=0)
    return max(1, round(longest / points))


def eval_curve_specs(runs: Sequence[Run]) -> list[CurveSpec]:
    """One spec per eval accuracy column any run has (every ``eval/<dataset>/acc_avg@k``)."""
    columns = sorted({c for r in runs for c in r.metrics.columns if EVAL_ACCURACY.match(c)})
    specs = []
    for column in columns:
        match = EVAL_ACCURACY.match(column)
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"eval_{match['dataset']}_{match['metric']}")
        specs.append(CurveSpec(key, f"Eval accuracy on {match['dataset']}", f"accuracy ({match['metric']})",
                               (column,), eval_points=True))
    return specs


def probe_curve_specs(runs: Sequence[Run]) -> list[CurveSpec]:
    """The held-out probe on uninferable questions (confidence Δ and overconfidence Δ), when any run has it."""
    spec = CurveSpec(
        "heldout_probe",
        "Answer probe on held-out uninferable questions",
        "change from the starting model",
        (LEAKAGE_QUANTITIES["uninferable_confidence_change"].column,
         LEAKAGE_QUANTITIES["uninferable_overconfidence_change"].column),
        ("letter confidence Δ", "overconfidence Δ"),
        eval_points=True,
    )
    return [spec] if has_data(runs, spec.columns) else []


def collapse_curve_specs(runs: Sequence[Run]) -> list[CurveSpec]:
    """Collapse and exploration on the held-out synthetic sets, a panel per kind: the top answer share and the
    distinct answers@k (the largest k any run logged), those any run has."""
    columns = {c for r in runs for c in r.metrics.columns}
    kinds = tuple(f"{kind} held-out" for kind in KINDS)
    specs = (
        CurveSpec("heldout_collapse", "Collapse: share of the most frequent letter among sampled answers",
                  "top answer share", tuple(prefix + "answer_top_share" for prefix in KINDS.values()), kinds,
                  eval_points=True),
        CurveSpec("heldout_diversity", "Exploration: distinct letters among a question's sampled answers",
                  "distinct answers@k", tuple(resolve_column(columns, prefix + "distinct_answers@{k}")
                                              for prefix in KINDS.values()), kinds, eval_points=True),
    )
    return [spec for spec in specs if has_data(runs, spec.columns)]


def _draw_band(ax, runs: Sequence[Run], column: str, colour: str, spec: CurveSpec, window: int) -> bool:
    """One method's curve: seed mean (smoothed when ``window > 1``, the raw mean faint behind) ± s.e."""
    band = seed_band(runs, column, interpolate=not spec.eval_points, window=window)
    if band.empty:
        return False
    seeds = len(runs)
    label = f"{runs[0].method} ({seeds} seed{'s' if seeds != 1 else ''})"
    if window > 1:
        raw = seed_band(runs, column)
        ax.plot(raw.index.to_numpy(dtype=float), raw["mean"].to_numpy(dtype=float), color=colour,
                linewidth=0.7, alpha=0.25, zorder=1)
    steps = band.index.to_numpy(dtype=float)
    mean, se = band["mean"].to_numpy(dtype=float), band["se"].to_numpy(dtype=float)
    marker = dict(marker="o", markersize=4) if spec.eval_points else {}
    ax.plot(steps, mean, color=colour, linewidth=2.0, label=label, zorder=3, **marker)  # lines above every band
    if np.isfinite(se).any():
        ax.fill_between(steps, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0, zorder=2)
    return True


def _draw_panel(ax, runs: Sequence[Run], column: str, spec: CurveSpec, colours: dict[str, str], window: int) -> None:
    methods = sorted({r.method for r in runs}, key=method_sort_key)
    drawn = [_draw_band(ax, [r for r in runs if r.method == m], column, colours[m], spec, window) for m in methods]
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    if any(drawn):
        ax.legend(fontsize="small", framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")


def _plot_one(runs: Sequence[Run], spec: CurveSpec, colours: dict[str, str], path: Path) -> Path:
    """One PNG for ``spec``: rows = training datasets with data, columns = ``spec.columns``."""
    datasets = sorted({r.dataset for r in runs if has_data([r], spec.columns)})
    window = 1 if spec.eval_points else smoothing_window(runs, spec.columns)
    nrows, ncols = len(datasets), len(spec.columns)
    fig = Figure(figsize=(6.0 * ncols, 4.0 * nrows + 0.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex="row", sharey="row")
    for row, dataset in enumerate(datasets):
        subset = [r for r in runs if r.dataset == dataset]
        for col, column in enumerate(spec.columns):
            ax = axes[row][col]
            _draw_panel(ax, subset, column, spec, colours, window)
            panel = spec.panel_titles[col] if spec.panel_titles else ""
            ax.set_title(f"{dataset} · {panel}" if panel else f"trained on {dataset}", fontsize="medium")
    fig.suptitle(spec.title, fontsize="large", fontweight="bold")
    note = "mean over seeds ± standard error" + (
        f"; rolling mean over {window} steps, unsmoothed mean faint" if window > 1 else "")
    fig.supxlabel(note, fontsize="small", color="dimgrey")  # a figure-level label: constrained layout makes room
    fig.savefig(path, dpi=DPI)
    return path


def _plot_all(runs: Sequence[Run], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Every curve PNG that has data, and a line per skipped one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = method_colours(r.method for r in runs)
    written, skipped = [], []
    for spec in (*TRAIN_CURVES, *eval_curve_specs(runs), *probe_curve_specs(runs), *collapse_curve_specs(runs)):
        if not has_data(runs, spec.columns):
            skipped.append(f"{spec.key}: no run has {' or '.join(spec.columns)}")
            continue
        written.append(_plot_one(runs, spec, colours, out_dir / f"{spec.key}.png"))
    return written, skipped


def plot_curves(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write one PNG per quantity (entropy, leakage, λ, reward, eval accuracies, held-out probe, collapse and
    diversity) into ``out_dir``.

    A quantity no run has is skipped (logged; ``write_report`` lists them in ``ReportFiles.skipped``).
    """
    written, skipped = _plot_all(runs, Path(out_dir))
    for line in skipped:
        log.info("skipped plot %s", line)
    return written


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportFiles:
    """What ``write_report`` wrote, and the plots it skipped (with the reason)."""

    out_dir: Path
    table_md: Path
    table_csv: Path
    runs_csv: Path
    plots: list[Path]
    skipped: list[str] = field(default_factory=list)
    runs: int = 0
    leakage_md: Path | None = None  # None: no run has the held-out synthetic probe
    leakage_csv: Path | None = None
    sweep_md: Path | None = None  # None: no sweep key was given
    sweep_csv: Path | None = None


def write_report(
    paths: str | Path | Iterable[str | Path],
    out_dir: str | Path | None = None,
    *,
    start: str | Path | Iterable[str | Path] = (),
    sweep: str | None = None,
) -> ReportFiles:
    """Find the runs under ``paths`` and write plots, ``results.md``, ``results.csv`` and ``runs.csv``.

    Also ``leakage.md`` and ``leakage.csv`` when a run has the held-out synthetic probe. ``start``: directories of
    starting-model evaluations (``src/eval.py``) that stand for step 0 of the runs that skipped it
    (:mod:`demopsd.report.start`). ``sweep``: a setting (``optim.lr``) the runs differ in; ``sweep.md`` and
    ``sweep.csv`` then hold one row per (method, value) (:mod:`demopsd.report.sweep`), and the other tables and the
    plots show each (method, value) as a method of its own.
    ``out_dir`` defaults to ``<first path>/report``.
    """
    roots = as_paths(paths)
    out = Path(out_dir) if out_dir is not None else (roots[0] if roots else Path(".")) / "report"
    runs = find_runs(roots)
    if as_paths(start):
        runs = with_starting_model(runs, find_starting_evaluations(start))
    out.mkdir(parents=True, exist_ok=True)
    sweep_md, sweep_csv = write_sweep(runs, out, sweep) if sweep else (None, None)
    if sweep:
        runs = labelled_by_setting(runs, sweep)
    plots, skipped = _plot_all(runs, out)
    leakage_md, leakage_csv = write_leakage(runs, out)
    table_md, table_csv, runs_csv = write_results(runs, out)
    return ReportFiles(out, table_md, table_csv, runs_csv, plots, skipped, len(runs), leakage_md, leakage_csv,
                       sweep_md, sweep_csv)
