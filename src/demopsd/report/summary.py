"""The few lines a finished run prints about what it measured, read back from its ``metrics.csv``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

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
    return "\n".join([header, *lines, *footer])


def _values(metrics: pd.DataFrame, column: str, index: str | None = None) -> pd.Series:
    if column not in metrics.columns:
        return pd.Series(dtype="float64")
    rows = metrics.dropna(subset=[column])
    return rows[index] if index else rows[column]
