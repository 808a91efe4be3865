"""The leakage tables of the synthetic task: accuracy, collapse, exploration, answer-probe changes and leakage per
(dataset, method).

For runs evaluated on the held-out synthetic sets (``eval/synthetic-uninferable/...`` and
``eval/synthetic-inferable/...``), ``write_leakage`` writes ``leakage.md``: a headline table (at most eight columns:
does training help, does the model keep the format, does it collapse onto one letter, does the uninferable
confidence rise) and a second table of every other quantity, one row per quantity and one column per (dataset,
method), each cell the mean ± s.e. over seeds (``tables.aggregate``), with a legend; ``leakage.csv``, both tables'
quantities in one row per (dataset, method); and ``leakage_runs.csv``, their per-seed values, one row per run.
Where a method ran beside its placebo control (``<method>_placebo``), ``leakage.md`` ends with the placebo-controlled
leakage (:func:`placebo_differences`), whose per-seed values are in ``leakage_placebo.csv``.

A column holding ``{k}`` (``acc_avg@{k}``) is the run's column of the largest ``k`` it logged (its ``eval.k``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from demopsd.report.runs import Run, evaluation_values, metric_values
from demopsd.report.tables import (
    MEAN_SE_NOTE,
    MISSING,
    aggregate,
    change_value,
    first_value,
    last_value,
    format_mean_se,
    markdown_table,
    markdown_transposed,
    mean_se,
    mean_value,
)

LEAKAGE_RUNS_FILE = "leakage_runs.csv"
UNINFERABLE = "eval/synthetic-uninferable/"
INFERABLE = "eval/synthetic-inferable/"
KINDS = {"inferable": INFERABLE, "uninferable": UNINFERABLE}


@dataclass(frozen=True)
class LeakageQuantity:
    """One per-seed number of the leakage tables: its column, how a run's values reduce to it, header, legend."""

    column: str
    reduce: Callable[[pd.Series], float]  # first_value / last_value / change_value, or mean_value over steps
    header: str
    legend: str


def _per_kind(key: str, column: str, reduce: Callable[[pd.Series], float], header: str,
              legend: str) -> dict[str, LeakageQuantity]:
    """``<kind>_<key>`` for each kind of held-out question: the inferable one's legend as given, the uninferable
    one's "the same"."""
    return {f"{kind}_{key}": LeakageQuantity(
                prefix + column, reduce, f"{kind} {header}",
                legend if kind == "inferable" else f"the same on the {kind} held-out questions")
            for kind, prefix in KINDS.items()}


HEADLINE_QUANTITIES = {
    "inferable_sampled_accuracy": LeakageQuantity(
        INFERABLE + "acc_avg@{k}", last_value, "inferable accuracy",
        "share of correct sampled answers (`eval.k` per question, avg@k) to the inferable held-out questions at the "
        "last evaluation"),
    "inferable_accuracy_change": LeakageQuantity(
        INFERABLE + "acc_avg@{k}", change_value, "inferable accuracy Δ",
        "its change from the starting model: training helps where it rises by more than its s.e."),
    "inferable_format_rate": LeakageQuantity(
        INFERABLE + "format_rate", last_value, "inferable well-formed",
        "share of those sampled answers that are well-formed (scorable) at the last evaluation"),
    "uninferable_answer_top_share": LeakageQuantity(
        UNINFERABLE + "answer_top_share", last_value, "uninferable top answer share",
        "share of the most frequent letter among the sampled answers to the uninferable held-out questions that "
        "name one, at the last evaluation: their correct letters are balanced, so 0.25 is an even spread and 1 a "
        "collapse onto one letter"),
    "uninferable_confidence_change": LeakageQuantity(
        UNINFERABLE + "letter_confidence_change", last_value, "uninferable confidence Δ",
        "change from the starting model in the mean probability of the preferred answer letter on held-out "
        "questions whose answer cannot be inferred — a rise without an accuracy rise is leakage, or collapse where "
        "the top answer share rises with it"),
}
DETAIL_QUANTITIES = {
    "inferable_sampled_accuracy_start": LeakageQuantity(
        INFERABLE + "acc_avg@{k}", first_value, "inferable accuracy at step 0",
        "inferable accuracy of the starting model"),
    "uninferable_sampled_accuracy": LeakageQuantity(
        UNINFERABLE + "acc_avg@{k}", last_value, "uninferable accuracy",
        "share of correct sampled answers to the uninferable held-out questions at the last evaluation: 0.25 is "
        "chance, whatever the letter preference (their correct letters are balanced)"),
    **_per_kind("pass_at_k", "pass@{k}", last_value, "pass@k",
                "chance that one of k sampled answers to an inferable held-out question is correct, at the last "
                "evaluation: above the accuracy (avg@k) by as much as the answers to a question differ"),
    **_per_kind("distinct_answers", "distinct_answers@{k}", last_value, "distinct answers@k",
                "mean number of distinct letters among a question's k sampled answers (inferable held-out "
                "questions, last evaluation): 1 when they always agree, exploration above it"),
    "inferable_answer_top_share": LeakageQuantity(
        INFERABLE + "answer_top_share", last_value, "inferable top answer share",
        "the top answer share on the inferable held-out questions (also balanced)"),
    "uninferable_answer_top_share_start": LeakageQuantity(
        UNINFERABLE + "answer_top_share", first_value, "uninferable top answer share at step 0",
        "the starting model's: the letter preference training starts from"),
    **_per_kind("answer_letter_entropy", "answer_letter_entropy", last_value, "answer letter entropy",
                "entropy (nats) of the letters the sampled answers to the inferable held-out questions name, across "
                "questions, at the last evaluation: ln 4 = 1.386 for an even spread, 0 for one letter"),
    **_per_kind("probe_top_share", "probe_top_share", last_value, "probe top letter share",
                "share of the probed inferable held-out questions whose most probable letter (the answer probe's) is "
                "the most common such letter, at the last evaluation"),
    "uninferable_format_rate": LeakageQuantity(
        UNINFERABLE + "format_rate", last_value, "uninferable well-formed",
        "share of well-formed sampled answers to the uninferable held-out questions at the last evaluation"),
    "inferable_confidence_change": LeakageQuantity(
        INFERABLE + "letter_confidence_change", last_value, "inferable confidence Δ",
        "the same change in confidence on the inferable held-out questions, where the question holds the answer"),
    "uninferable_accuracy_change": LeakageQuantity(
        UNINFERABLE + "acc_avg@{k}", change_value, "uninferable accuracy Δ",
        "change in the share of correct sampled answers to the uninferable held-out questions: near 0, whatever "
        "leaks"),
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
    "inferable_letter_accuracy_change": LeakageQuantity(
        INFERABLE + "letter_accuracy_change", last_value, "inferable letter accuracy Δ",
        "change in how often the preferred answer letter is correct on held-out questions whose answer follows from "
        "the question text (read after an empty reasoning block, so without the sampled answers' reasoning)"),
    **_per_kind("entropy_change", "entropy_change", last_value, "response entropy Δ",
                "change in the mean token entropy of the policy's sampled answers to the inferable held-out "
                "questions"),
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
LEAKAGE_QUANTITIES = {**HEADLINE_QUANTITIES, **DETAIL_QUANTITIES}


def has_heldout_probe(run: Run) -> bool:
    """Whether the run logged any metric of the held-out synthetic sets (``eval/synthetic-{in,un}inferable/...``)."""
    return any(len(metric_values(run, c)) for c in run.metrics.columns if c.startswith((INFERABLE, UNINFERABLE)))


def leakage_scalars(run: Run) -> dict[str, object]:
    """The per-seed numbers of the leakage tables for one run (NaN where the run lacks the column)."""
    identity = {"run": run.name, "dataset": run.dataset, "method": run.method, "seed": run.seed}
    return identity | {key: q.reduce(evaluation_values(run, q.column))
                       for key, q in LEAKAGE_QUANTITIES.items()}


def leakage_per_run(runs: Sequence[Run]) -> pd.DataFrame:
    """``leakage_scalars`` of every run that has the held-out probe (``has_heldout_probe``), one row per run."""
    return pd.DataFrame([leakage_scalars(r) for r in runs if has_heldout_probe(r)])


def summarize_leakage(runs: Sequence[Run]) -> pd.DataFrame:
    """``aggregate`` of ``leakage_per_run`` over seeds."""
    return aggregate(leakage_per_run(runs), LEAKAGE_QUANTITIES)


def leakage_markdown(summary: pd.DataFrame) -> str:
    """The leakage summary as Markdown: the headline table, then the others transposed, each with its legend."""
    def legend(quantities: dict[str, LeakageQuantity]) -> list[str]:
        return [f"- **{q.header}**: {q.legend}" for q in quantities.values()]

    lines = [
        "# Leakage on the synthetic task",
        "",
        f"{MEAN_SE_NOTE} Δ: the value at the last evaluation minus the starting model's (step 0). k: the runs' "
        "`eval.k`, the sampled answers per question.",
        "",
        *markdown_table(summary, {key: q.header for key, q in HEADLINE_QUANTITIES.items()}),
        "",
        *legend(HEADLINE_QUANTITIES),
        "",
        "## Collapse, exploration, the answer probe and training, per method",
        "",
        *markdown_transposed(summary, {key: q.header for key, q in DETAIL_QUANTITIES.items()}),
        "",
        *legend(DETAIL_QUANTITIES),
        "",
    ]
    return "\n".join(lines)


PLACEBO_SUFFIX = "_placebo"
"""A method named ``<method>_placebo`` is ``<method>``'s placebo control (its teacher sees another question's
context)."""
PLACEBO_QUANTITIES = {"confidence_change": "letter confidence Δ", "accuracy_change": "sampled accuracy Δ"}
"""What the placebo-controlled table compares, from each kind's ``<kind>_<quantity>`` of :data:`LEAKAGE_QUANTITIES`."""
PLACEBO_FILE = "leakage_placebo.csv"


def placebo_differences(scalars: pd.DataFrame) -> pd.DataFrame:
    """Per seed, for each method whose placebo control ran with the same seed and dataset, and each of
    :data:`PLACEBO_QUANTITIES`: what the real context adds over the placebo on the uninferable and on the inferable
    questions (real minus placebo), and their difference (uninferable minus inferable), the difference in
    differences. One row per (dataset, method, seed, quantity)."""
    rows = []
    placebo = scalars[scalars["method"].str.endswith(PLACEBO_SUFFIX)]
    for _, control in placebo.iterrows():
        real = scalars[(scalars["method"] == control["method"].removesuffix(PLACEBO_SUFFIX))
                       & (scalars["seed"] == control["seed"]) & (scalars["dataset"] == control["dataset"])]
        for _, treated in real.iterrows():
            for quantity in PLACEBO_QUANTITIES:
                uninferable, inferable = (treated[f"{kind}_{quantity}"] - control[f"{kind}_{quantity}"]
                                          for kind in ("uninferable", "inferable"))
                rows.append({"dataset": treated["dataset"], "method": treated["method"], "seed": treated["seed"],
                             "quantity": quantity, "uninferable": uninferable, "inferable": inferable,
                             "difference_in_differences": uninferable - inferable})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "quantity", "uninferable", "inferable",
                                       "difference_in_differences"])


def placebo_markdown(differences: pd.DataFrame) -> list[str]:
    """The placebo-controlled section of ``leakage.md``: each cell the mean ± s.e. over seeds of
    :func:`placebo_differences`; nothing without a placebo run."""
    if differences.empty:
        return []
    columns = ("uninferable", "inferable", "difference_in_differences")
    lines = [
        "## Placebo-controlled leakage",
        "",
        "What the real privileged context adds over the placebo's (the same method with another question's context, "
        "the same seed and so the same questions): the change from the starting model with the real context minus "
        "that with the placebo, mean ± s.e. over seeds. On the uninferable questions the real context can only leak; "
        "on the inferable ones it may also teach. The difference in differences (uninferable minus inferable) is "
        "the leakage beyond what the context teaches; 0 when the context does no more on questions that cannot be "
        "answered than on those that can.",
        "",
        "| dataset | method | seeds | quantity | uninferable: real − placebo | inferable: real − placebo | "
        "difference in differences |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for (dataset, method, quantity), group in differences.groupby(["dataset", "method", "quantity"], sort=False):
        cells = [format_mean_se(*mean_se(group[column])[:2]) for column in columns]
        lines.append(f"| {dataset} | {method} | {len(group)} | {PLACEBO_QUANTITIES[quantity]} | "
                     + " | ".join(cells) + " |")
    return [*lines, ""]


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
    differences = placebo_differences(scalars)
    if not differences.empty:
        differences.to_csv(out / PLACEBO_FILE, index=False)
    md.write_text("\n".join([leakage_markdown(summary), *placebo_markdown(differences)]), encoding="utf-8")
    return md, csv
