"""Reports over finished (or running) training runs: curves per method and a results table.

A *run directory* is any folder holding both ``metrics.csv`` (Lightning's CSVLogger) and
``config_resolved.yaml``; a Hydra multirun folder holds several. ``write_report`` finds every run
under the given paths and writes, into one output folder:

* ``<quantity>.png``: entropy, leakage, λ, reward and every ``eval/<dataset>/acc_avg@k`` column
  over training steps; one colour per method, seeds aggregated as mean ± standard error band,
  one row of panels per training dataset; long per-step curves are smoothed (rolling mean over
  about 1/30 of the run, the raw mean drawn faintly behind), eval points are not;
* ``results.md`` / ``results.csv``: one row per (dataset, method), each number the mean ± s.e.
  over seeds of a per-seed scalar (best / final accuracy, final entropy, mean leakage);
* ``runs.csv``: those per-seed scalars, one row per run;
* for runs evaluated on the held-out synthetic sets (``eval/synthetic-uninferable/...`` and
  ``eval/synthetic-inferable/...``, the leakage task): ``leakage.md`` / ``leakage.csv``, one row per
  (dataset, method) of answer-probe changes from the starting model, entropies and mean leakage,
  with a legend; ``leakage_runs.csv``, their per-seed values, one row per run; and
  ``heldout_probe.png``, the uninferable confidence and overconfidence changes over steps.

The standard error is ``std(ddof=1) / sqrt(n)`` over seeds; with one seed there is none (the
table shows ``0.412 ± —``, the plot no band).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"
LEAKAGE_RUNS_FILE = "leakage_runs.csv"
CONFIG_FILE = "config_resolved.yaml"
METHOD_ORDER = ("demopsd", "sdpo", "opsd", "grpo")
METHOD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")  # demopsd, sdpo, opsd, grpo
OTHER_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
EVAL_ACCURACY = re.compile(r"^eval/(?P<dataset>.+)/(?P<metric>acc_avg@(?P<k>\d+))$")
DPI = 120
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


# --------------------------------------------------------------------------- discovery


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every run directory at any depth under ``paths`` (a path itself may be one), sorted by path.

    Raises ``FileNotFoundError`` for a path that does not exist and ``NoRunsError`` (naming the
    searched paths) when none holds a run.
    """
    roots = _as_paths(paths)
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


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _run_dirs_under(root: Path) -> list[Path]:
    if root.is_file():
        root = root.parent
    candidates = [root / METRICS_FILE, *root.rglob(METRICS_FILE)]
    return [c.parent for c in candidates if c.is_file() and (c.parent / CONFIG_FILE).is_file()]


# --------------------------------------------------------------------------- methods and colours


def method_sort_key(method: str) -> tuple[int, str]:
    """The fixed order demopsd, sdpo, opsd, grpo, then other methods alphabetically."""
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """A colour per method: fixed for the four known methods, the rest in alphabetical order."""
    colours = dict(zip(METHOD_ORDER, METHOD_COLOURS))
    others = sorted(set(methods) - set(METHOD_ORDER))
    colours.update({m: OTHER_COLOURS[i % len(OTHER_COLOURS)] for i, m in enumerate(others)})
    return colours


# --------------------------------------------------------------------------- per-seed scalars


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


def _values(run: Run, column: str | None) -> pd.Series:
    if column is None or column not in run.metrics.columns:
        return pd.Series(dtype="float64")
    return pd.to_numeric(run.metrics[column], errors="coerce").dropna()


def _last(values: pd.Series) -> float:
    return float(values.iloc[-1]) if len(values) else math.nan


def _first(values: pd.Series) -> float:
    return float(values.iloc[0]) if len(values) else math.nan


def _max(values: pd.Series) -> float:
    return float(values.max()) if len(values) else math.nan


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def _eval_columns_of(run: Run) -> tuple[str | None, str | None]:
    """The run's in-domain eval column (its own dataset) and its GPQA column, or None.

    GPQA is the first ``gpqa*`` eval dataset in alphabetical order (``gpqa-diamond`` when present).
    """
    columns = {d: c for d, c in eval_accuracy_columns(run.metrics.columns).items() if len(_values(run, c))}
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
        "indomain_best": _max(_values(run, indomain)),
        "indomain_final": _last(_values(run, indomain)),
        "gpqa_best": _max(_values(run, gpqa)),
        "gpqa_final": _last(_values(run, gpqa)),
        "entropy_final": _last(_values(run, "train/entropy")),
        "leakage_mean": _mean(_values(run, "leakage/kl_teacher_student")),
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
        cells = [str(row["dataset"]), str(row["method"]), str(row["seeds"])]
        for q in headers:
            cell = format_mean_se(row[f"{q}_mean"], row[f"{q}_se"])
            n = int(row[f"{q}_n"])
            cells.append(cell if n in (0, row["seeds"]) else f"{cell} (n={n})")
        lines.append("| " + " | ".join(cells) + " |")
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


# --------------------------------------------------------------------------- leakage table (synthetic task)


UNINFERABLE = "eval/synthetic-uninferable/"
INFERABLE = "eval/synthetic-inferable/"


@dataclass(frozen=True)
class LeakageQuantity:
    """One per-seed number of the leakage table: its column, how a run's values reduce to it, header, legend."""

    column: str
    reduce: Callable[[pd.Series], float]  # _first / _last logged value, or _mean over steps
    header: str
    legend: str


LEAKAGE_QUANTITIES = {
    "uninferable_confidence_change": LeakageQuantity(
        UNINFERABLE + "letter_confidence_change", _last, "uninferable confidence Δ",
        "change from the starting model in the mean probability of the preferred answer letter on held-out "
        "questions whose answer cannot be inferred — a rise without an accuracy rise is leakage"),
    "uninferable_overconfidence_change": LeakageQuantity(
        UNINFERABLE + "overconfidence_change", _last, "uninferable overconfidence Δ",
        "change in confidence minus accuracy of the answer letter on those questions — above 0: the model "
        "became surer without becoming more often right"),
    "uninferable_letter_entropy_change": LeakageQuantity(
        UNINFERABLE + "letter_entropy_change", _last, "uninferable letter entropy Δ",
        "change in the entropy (nats) of the answer-letter distribution on those questions — below 0: the "
        "model commits to letters it cannot know"),
    "uninferable_letter_accuracy_change": LeakageQuantity(
        UNINFERABLE + "letter_accuracy_change", _last, "uninferable letter accuracy Δ",
        "change in how often the preferred answer letter is correct on those questions — their correct letter is "
        "random, so this should stay near 0"),
    "inferable_sampled_accuracy": LeakageQuantity(
        INFERABLE + "acc_avg@1", _last, "inferable accuracy (sampled)",
        "share of correct sampled answers (one per question, the laptop job's `eval.k=1`) to the inferable held-out "
        "questions at the last evaluation"),
    "inferable_sampled_accuracy_start": LeakageQuantity(
        INFERABLE + "acc_avg@1", _first, "inferable accuracy at step 0",
        "the same for the starting model"),
    "inferable_format_rate": LeakageQuantity(
        INFERABLE + "format_rate", _last, "inferable well-formed",
        "share of those sampled answers that are well-formed (scorable) at the last evaluation"),
    "inferable_letter_accuracy_change": LeakageQuantity(
        INFERABLE + "letter_accuracy_change", _last, "inferable letter accuracy Δ",
        "change in how often the preferred answer letter is correct on held-out questions whose answer follows from "
        "the question text (read after an empty reasoning block, so without the sampled answers' reasoning)"),
    "uninferable_entropy_change": LeakageQuantity(
        UNINFERABLE + "entropy_change", _last, "uninferable response entropy Δ",
        "change in the mean token entropy of the policy's sampled answers to the uninferable held-out questions"),
    "inferable_entropy_change": LeakageQuantity(
        INFERABLE + "entropy_change", _last, "inferable response entropy Δ",
        "the same on the inferable held-out questions"),
    "entropy_final": LeakageQuantity(
        "train/entropy", _last, "final train entropy",
        "last logged `train/entropy`: the policy's token entropy on its own training rollouts"),
    "reward_mean": LeakageQuantity(
        "train/reward_mean", _mean, "mean train reward",
        "mean over steps of the training rollouts' reward (their accuracy)"),
    "demonstration_fraction_mean": LeakageQuantity(
        "distill/demonstration_fraction", _mean, "context a successful sibling",
        "mean over steps of the share of rollouts whose teacher context is a successful sibling's answer (the rest "
        f"get the reference answer; {MISSING} for GRPO)"),
    "varied_group_fraction_mean": LeakageQuantity(
        "grpo/varied_group_fraction", _mean, "GRPO groups with varied rewards",
        "mean over steps of the share of prompts whose rollouts got different rewards, the only ones GRPO learns from"),
    "kl_teacher_student_mean": LeakageQuantity(
        "leakage/kl_teacher_student", _mean, "mean KL(teacher ‖ student)",
        "mean over steps of KL(teacher ‖ student) per token, on the objective's support: how far the privileged "
        f"context moves the teacher away from the student ({MISSING} for a method without a teacher, such as GRPO)"),
    "kl_target_student_mean": LeakageQuantity(
        "leakage/kl_target_student", _mean, "mean KL(target ‖ student)",
        "mean over steps of KL(target ‖ student) per token, on the same support: how much of that the distillation "
        "target passes on"),
    "attenuation_mean": LeakageQuantity(
        "leakage/attenuation", _mean, "mean attenuation",
        "mean over steps of KL(target ‖ student) / KL(teacher ‖ student): 1 where the target is the teacher "
        "(SDPO, OPSD); below 1, the target passes on less than the teacher's full shift"),
}
HELDOUT_PROBE_COLUMNS = tuple(q.column for q in LEAKAGE_QUANTITIES.values() if q.column.startswith("eval/"))


def has_heldout_probe(run: Run) -> bool:
    """Whether the run logged any of the held-out synthetic probe columns (``eval/synthetic-*/..._change``)."""
    return _has_data([run], HELDOUT_PROBE_COLUMNS)


def leakage_scalars(run: Run) -> dict[str, object]:
    """The per-seed numbers of the leakage table for one run (NaN where the run lacks the column)."""
    identity = {"run": run.name, "dataset": run.dataset, "method": run.method, "seed": run.seed}
    return identity | {key: q.reduce(_values(run, q.column)) for key, q in LEAKAGE_QUANTITIES.items()}


def leakage_per_run(runs: Sequence[Run]) -> pd.DataFrame:
    """``leakage_scalars`` of every run that has the held-out probe (``has_heldout_probe``), one row per run."""
    return pd.DataFrame([leakage_scalars(r) for r in runs if has_heldout_probe(r)])


def summarize_leakage(runs: Sequence[Run]) -> pd.DataFrame:
    """``aggregate`` of ``leakage_per_run`` over seeds."""
    return aggregate(leakage_per_run(runs), LEAKAGE_QUANTITIES)


def leakage_markdown(summary: pd.DataFrame) -> str:
    """The leakage summary as a Markdown table, then one legend line per column."""
    intro = [
        "# Leakage on the synthetic task",
        "",
        f"{MEAN_SE_NOTE} Δ: the value at the last evaluation minus the starting model's (step 0).",
        "",
    ]
    headers = {key: q.header for key, q in LEAKAGE_QUANTITIES.items()}
    legend = [f"- **{q.header}**: {q.legend}" for q in LEAKAGE_QUANTITIES.values()]
    return "\n".join(intro + markdown_table(summary, headers) + ["", *legend, ""])


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
    longest = max((len(_values(r, c)) for r in runs for c in columns), default=0)
    return max(1, round(longest / points))


def _has_data(runs: Sequence[Run], columns: Iterable[str]) -> bool:
    return any(len(_values(r, c)) for r in runs for c in columns)


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
    return [spec] if _has_data(runs, spec.columns) else []


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
    datasets = sorted({r.dataset for r in runs if _has_data([r], spec.columns)})
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
    for spec in (*TRAIN_CURVES, *eval_curve_specs(runs), *probe_curve_specs(runs)):
        if not _has_data(runs, spec.columns):
            skipped.append(f"{spec.key}: no run has {' or '.join(spec.columns)}")
            continue
        written.append(_plot_one(runs, spec, colours, out_dir / f"{spec.key}.png"))
    return written, skipped


def plot_curves(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write one PNG per quantity (entropy, leakage, λ, reward, eval accuracies, held-out probe) into ``out_dir``.

    A quantity no run has is skipped (logged; ``write_report`` lists them in ``ReportFiles.skipped``).
    """
    written, skipped = _plot_all(runs, Path(out_dir))
    for line in skipped:
        log.info("skipped plot %s", line)
    return written


# --------------------------------------------------------------------------- report


def write_report(paths: str | Path | Iterable[str | Path], out_dir: str | Path | None = None) -> ReportFiles:
    """Find the runs under ``paths`` and write plots, ``results.md``, ``results.csv`` and ``runs.csv``.

    Also ``leakage.md`` and ``leakage.csv`` when a run has the held-out synthetic probe.
    ``out_dir`` defaults to ``<first path>/report``.
    """
    roots = _as_paths(paths)
    out = Path(out_dir) if out_dir is not None else (roots[0] if roots else Path(".")) / "report"
    runs = find_runs(roots)
    out.mkdir(parents=True, exist_ok=True)
    scalars = per_run(runs)
    summary = summarize(runs)
    plots, skipped = _plot_all(runs, out)
    leakage_md, leakage_csv = _write_leakage(runs, out)
    files = ReportFiles(out, out / "results.md", out / "results.csv", out / "runs.csv", plots, skipped, len(runs),
                        leakage_md, leakage_csv)
    summary.to_csv(files.table_csv, index=False)
    scalars.to_csv(files.runs_csv, index=False)
    files.table_md.write_text(results_markdown(summary, _table_notes(scalars)), encoding="utf-8")
    return files


def _write_leakage(runs: Sequence[Run], out: Path) -> tuple[Path | None, Path | None]:
    """``leakage.md``, ``leakage.csv`` and the per-seed ``leakage_runs.csv`` in ``out``; returns the first two,
    or ``(None, None)`` when no run has the held-out probe."""
    scalars = leakage_per_run(runs)
    if scalars.empty:
        return None, None
    summary = aggregate(scalars, LEAKAGE_QUANTITIES)
    md, csv = out / "leakage.md", out / "leakage.csv"
    summary.to_csv(csv, index=False)
    scalars.to_csv(out / LEAKAGE_RUNS_FILE, index=False)
    md.write_text(leakage_markdown(summary), encoding="utf-8")
    return md, csv
