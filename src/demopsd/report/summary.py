"""The few lines a finished run prints about what it measured, read back from its ``metrics.csv``: first a verdict
(did training help, change nothing, or make the model worse; did it lose the format or collapse onto one letter),
then the numbers behind it."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from demopsd.report.runs import resolve_column
from demopsd.report.sweep import evaluation_samples, paired_change

SIGNIFICANT_AT = 2.0
"""A held-out accuracy changed when its change is at least this many standard errors."""
FORMAT_LOST_BELOW = 0.9
"""The answer format is lost when fewer than this share of the sampled answers are well-formed (and fewer than at
the start)."""
COLLAPSED_AT = (0.8, 0.2)
"""Answers collapsed onto one letter when the most frequent letter's share ends at least 0.8, up at least 0.2."""

PROBE = (("letter_confidence", "letter confidence"), ("overconfidence", "overconfidence"),
         ("letter_entropy", "letter entropy"), ("letter_accuracy", "letter accuracy"), ("entropy", "response entropy"))
ROLLOUTS = (("train/reward_mean", "reward"), ("train/format_rate", "well-formed"),
            ("distill/demonstration_fraction", "context a successful sibling"),
            ("grpo/varied_group_fraction", "groups with varied rewards"))
LEAKAGE = (("leakage/kl_teacher_student", "KL(teacher‖student)"), ("leakage/kl_target_student", "KL(target‖student)"),
           ("leakage/attenuation", "attenuation"))


def run_summary(metrics_csv: str | Path, plots: str | Path | None = None) -> str:
    """What the run measured: for each evaluated dataset the accuracy (± its standard error over questions, where
    logged), the share of well-formed answers and the answer-probe metrics at the first and the last evaluation
    (and the difference), the training entropy at the first and last step, the rollouts' reward, well-formed share
    and (per method) share of contexts that are a successful sibling or of groups with varied rewards, and the mean
    leakage per token over training; then where the plots are. Empty when ``metrics_csv`` has none of these."""
    metrics = pd.read_csv(metrics_csv)
    lines = []
    datasets = sorted({c.split("/")[1] for c in metrics.columns if c.startswith("eval/") and c.count("/") == 2})
    for dataset in datasets:
        parts, steps = [], None
        accuracy = sorted(c.rsplit("/", 1)[1] for c in metrics.columns
                          if c.startswith(f"eval/{dataset}/acc_avg@") and not c.endswith("_change"))
        for key, label in (*((key, "accuracy") for key in accuracy[:1]), ("format_rate", "well-formed"), *PROBE):
            values = _values(metrics, f"eval/{dataset}/{key}")
            if len(values) > 1:
                steps = _values(metrics, f"eval/{dataset}/{key}", index="step") if steps is None else steps
                first, last = (f"{v:.3f}" for v in (values.iloc[0], values.iloc[-1]))
                if key in accuracy:
                    errors = _values(metrics, f"eval/{dataset}/{key.replace('acc_avg@', 'acc_avg_se@')}")
                    if len(errors) == len(values):  # runs from before it was logged have none
                        first, last = f"{first} ± {errors.iloc[0]:.3f}", f"{last} ± {errors.iloc[-1]:.3f}"
                parts.append(f"{label} {first} → {last} ({values.iloc[-1] - values.iloc[0]:+.3f})")
        if parts:  # evaluations are logged together, so any reported metric's steps are theirs
            lines.append(f"  {dataset} (step {steps.iloc[0]:g} → {steps.iloc[-1]:g}): " + ", ".join(parts))
    entropy = _values(metrics, "train/entropy")
    if len(entropy):
        lines.append(f"  training entropy: {entropy.iloc[0]:.3f} at the first step → {entropy.iloc[-1]:.3f} at the last")
    rollouts = [f"{label} {_values(metrics, key).mean():.3f}" for key, label in ROLLOUTS if len(_values(metrics, key))]
    if rollouts:
        lines.append("  rollouts, mean over training: " + ", ".join(rollouts))
    leakage = [f"{label} {_values(metrics, key).mean():.4f}" for key, label in LEAKAGE if len(_values(metrics, key))]
    if leakage:
        lines.append("  mean per token over training: " + ", ".join(leakage))
    if not lines:
        return ""
    header = "What this run measured (held-out questions: first → last evaluation):"
    footer = [f"Plots and tables: {plots}"] if plots else []
    first = verdict(metrics, Path(metrics_csv).parent, datasets)
    return "\n".join([*([first] if first else []), header, *lines, *footer])


def verdict(metrics: pd.DataFrame, run_dir: Path, datasets: list[str]) -> str | None:
    """One line: whether each dataset's held-out accuracy rose, fell or stayed within :data:`SIGNIFICANT_AT`
    standard errors from the first to the last evaluation, and whether the answers lost their format or collapsed
    onto one letter; None without two evaluations with a standard error. A run that did not evaluate its start
    (``eval.at_start=false``) is judged from its first evaluation, and the line says so. The standard error is
    paired (per question, from the evaluations' ``samples.jsonl`` under ``run_dir``) where both are there, else that
    of two independent means."""
    judged, flags, spans = {}, [], set()
    for dataset in datasets:
        column = resolve_column(metrics.columns, f"eval/{dataset}/acc_avg@{{k}}")
        evaluated = metrics.dropna(subset=[column]) if column in metrics.columns else metrics.iloc[:0]
        if len(evaluated) < 2:
            continue
        steps = evaluated["step"].astype(int)
        spans.add((steps.iloc[0], steps.iloc[-1]))
        first, last = float(evaluated[column].iloc[0]), float(evaluated[column].iloc[-1])
        change, se, kind = accuracy_change(evaluated, column, run_dir, dataset, steps.iloc[0], steps.iloc[-1])
        if math.isnan(se):  # nothing to judge the change by
            continue
        status = ("unchanged" if abs(change) < SIGNIFICANT_AT * se or change == 0
                  else "better" if change > 0 else "worse")
        judged[dataset] = (status, f"{dataset} {status}, accuracy {first:.3f} → {last:.3f} ({change:+.3f} ± "
                                   f"{se:.3f} {kind} s.e.)")
        # at the evaluations that logged the accuracy: NaN, never an earlier value, where one left a metric out
        well_formed = _at_evaluations(evaluated, f"eval/{dataset}/format_rate")
        if len(well_formed) > 1 and well_formed.iloc[-1] < min(FORMAT_LOST_BELOW, well_formed.iloc[0]):
            flags.append(f"lost the answer format on {dataset} (well-formed {well_formed.iloc[0]:.2f} → "
                         f"{well_formed.iloc[-1]:.2f})")
        top = _at_evaluations(evaluated, f"eval/{dataset}/answer_top_share")  # none when no answer names a letter
        if len(top) > 1 and top.iloc[-1] >= COLLAPSED_AT[0] and top.iloc[-1] - top.iloc[0] >= COLLAPSED_AT[1]:
            flags.append(f"collapsed onto one answer letter on {dataset} (top letter's share {top.iloc[0]:.2f} → "
                         f"{top.iloc[-1]:.2f})")
    if not judged:
        return None
    statuses = {status for status, _ in judged.values()}
    span = next(iter(spans)) if len(spans) == 1 else None  # the datasets are evaluated together
    if span is None:
        training = "Training between its first and last evaluations"
    elif span[0] == 0:
        training = "Training"
    else:
        training = f"Training from step {span[0]} to {span[1]} (the start was not evaluated)"
    outcome = ("made the model worse" if "worse" in statuses
               else "damaged the model's answers" if flags
               else "helped" if "better" in statuses
               else f"changed no held-out accuracy by {SIGNIFICANT_AT:g} standard errors or more")
    lead = f"{training} {outcome}"
    return f"{lead}: " + "; ".join(text for _, text in judged.values()) + "".join(f"; it {flag}" for flag in flags)


def accuracy_change(evaluated: pd.DataFrame, column: str, run_dir: Path, dataset: str, first_step: int,
                    last_step: int) -> tuple[float, float, str]:
    """The change of ``column`` from the first evaluation to the last, its standard error and which kind it is."""
    samples = [evaluation_samples(run_dir, step) for step in (first_step, last_step)]
    if all(path.is_file() for path in samples):
        change, se, _ = paired_change(*samples, dataset=dataset)
        return change, se, "paired"
    change = float(evaluated[column].iloc[-1] - evaluated[column].iloc[0])
    errors = _values(evaluated, column.replace("acc_avg@", "acc_avg_se@"))
    se = math.hypot(errors.iloc[0], errors.iloc[-1]) if len(errors) == len(evaluated) else math.nan
    return change, se, "unpaired"


def _at_evaluations(evaluated: pd.DataFrame, column: str) -> pd.Series:
    return evaluated[column] if column in evaluated.columns else pd.Series(dtype="float64")


def _values(metrics: pd.DataFrame, column: str, index: str | None = None) -> pd.Series:
    if column not in metrics.columns:
        return pd.Series(dtype="float64")
    rows = metrics.dropna(subset=[column])
    return rows[index] if index else rows[column]
