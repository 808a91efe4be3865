"""The leakage table of the synthetic task: answer-probe changes, entropies and leakage per (dataset, method).

For runs evaluated on the held-out synthetic sets (``eval/synthetic-uninferable/...`` and
``eval/synthetic-inferable/...``), ``write_leakage`` writes ``leakage.md`` / ``leakage.csv``, one row per
(dataset, method) of answer-probe changes from the starting model, entropies and mean leakage, each the
mean ± s.e. over seeds (``tables.aggregate``), with a legend; and ``leakage_runs.csv``, their per-seed values,
one row per run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from demopsd.report.runs import Run, has_data, metric_values
from demopsd.report.tables import (
    MEAN_SE_NOTE,
    MISSING,
    aggregate,
    first_value,
    last_value,
    markdown_table,
    mean_value,
)

LEAKAGE_RUNS_FILE = "leakage_runs.csv"
UNINFERABLE = "eval/synthetic-uninferable/"
INFERABLE = "eval/synthetic-inferable/"


@dataclass(frozen=True)
class LeakageQuantity:
    """One per-seed number of the leakage table: its column, how a run's values reduce to it, header, legend."""

    column: str
    reduce: Callable[[pd.Series], float]  # first_value / last_value, or mean_value over steps
    header: str
    legend: str


LEAKAGE_QUANTITIES = {
    "uninferable_confidence_change": LeakageQuantity(
        UNINFERABLE + "letter_confidence_change", last_value, "uninferable confidence Δ",
        "change from the starting model in the mean probability of the preferred answer letter on held-out "
        "questions whose answer cannot be inferred — a rise without an accuracy rise is leakage"),
    "uninferable_overconfidence_change": LeakageQuantity(
        UNINFERABLE + "overconfidence_change", last_value, "uninferable overconfidence Δ",
        "change in confidence minus accuracy of the answer letter on those questions — above 0: the model "
        "became surer without becoming more often right"),
    "uninferable_letter_entropy_change": LeakageQuantity(
        UNINFERABLE + "letter_entropy_change", last_value, "uninferable letter entropy Δ",
        "change in the entropy (nats) of the answer-letter distribution on those questions — below 0: the "
        "model commits to letters it cannot know"),
    "uninferable_letter_accuracy_change": LeakageQuantity(
        UNINFERABLE + "letter_accuracy_change", last_value, "uninferable letter accuracy Δ",
        "change in how often the preferred answer letter is correct on those questions — their correct letter is "
        "random, so this should stay near 0"),
    "inferable_sampled_accuracy": LeakageQuantity(
        INFERABLE + "acc_avg@1", last_value, "inferable accuracy (sampled)",
        "share of correct sampled answers (one per question, the laptop job's `eval.k=1`) to the inferable held-out "
        "questions at the last evaluation"),
    "inferable_sampled_accuracy_start": LeakageQuantity(
        INFERABLE + "acc_avg@1", first_value, "inferable accuracy at step 0",
        "the same for the starting model"),
    "inferable_format_rate": LeakageQuantity(
        INFERABLE + "format_rate", last_value, "inferable well-formed",
        "share of those sampled answers that are well-formed (scorable) at the last evaluation"),
    "inferable_letter_accuracy_change": LeakageQuantity(
        INFERABLE + "letter_accuracy_change", last_value, "inferable letter accuracy Δ",
        "change in how often the preferred answer letter is correct on held-out questions whose answer follows from "
        "the question text (read after an empty reasoning block, so without the sampled answers' reasoning)"),
    "uninferable_entropy_change": LeakageQuantity(
        UNINFERABLE + "entropy_change", last_value, "uninferable response entropy Δ",
        "change in the mean token entropy of the policy's sampled answers to the uninferable held-out questions"),
    "inferable_entropy_change": LeakageQuantity(
        INFERABLE + "entropy_change", last_value, "inferable response entropy Δ",
        "the same on the inferable held-out questions"),
    "entropy_final": LeakageQuantity(
        "train/entropy", last_value, "final train entropy",
        "last logged `train/entropy`: the policy's token entropy on its own training rollouts"),
    "reward_mean": LeakageQuantity(
        "train/reward_mean", mean_value, "mean train reward",
        "mean over steps of the training rollouts' reward (their accuracy)"),
    "demonstration_fraction_mean": LeakageQuantity(
        "distill/demonstration_fraction", mean_value, "context a successful sibling",
        "mean over steps of the share of rollouts whose teacher context is a successful sibling's answer (the rest "
        f"get the reference answer; {MISSING} for GRPO)"),
    "varied_group_fraction_mean": LeakageQuantity(
        "grpo/varied_group_fraction", mean_value, "GRPO groups with varied rewards",
        "mean over steps of the share of prompts whose rollouts got different rewards, the only ones GRPO learns from"),
    "kl_teacher_student_mean": LeakageQuantity(
        "leakage/kl_teacher_student", mean_value, "mean KL(teacher ‖ student)",
        "mean over steps of KL(teacher ‖ student) per token, on the objective's support: how far the privileged "
        f"context moves the teacher away from the student ({MISSING} for a method without a teacher, such as GRPO)"),
    "kl_target_student_mean": LeakageQuantity(
        "leakage/kl_target_student", mean_value, "mean KL(target ‖ student)",
        "mean over steps of KL(target ‖ student) per token, on the same support: how much of that the distillation "
        "target passes on"),
    "attenuation_mean": LeakageQuantity(
        "leakage/attenuation", mean_value, "mean attenuation",
        "mean over steps of KL(target ‖ student) / KL(teacher ‖ student): 1 where the target is the teacher "
        "(SDPO, OPSD); below 1, the target passes on less than the teacher's full shift"),
}
HELDOUT_PROBE_COLUMNS = tuple(q.column for q in LEAKAGE_QUANTITIES.values() if q.column.startswith("eval/"))


def has_heldout_probe(run: Run) -> bool:
    """Whether the run logged any of the held-out synthetic probe columns (``eval/synthetic-*/..._change``)."""
    return has_data([run], HELDOUT_PROBE_COLUMNS)


def leakage_scalars(run: Run) -> dict[str, object]:
    """The per-seed numbers of the leakage table for one run (NaN where the run lacks the column)."""
    identity = {"run": run.name, "dataset": run.dataset, "method": run.method, "seed": run.seed}
    return identity | {key: q.reduce(metric_values(run, q.column)) for key, q in LEAKAGE_QUANTITIES.items()}


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


def write_leakage(runs: Sequence[Run], out: Path) -> tuple[Path | None, Path | None]:
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
