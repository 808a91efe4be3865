"""Reports over made-up runs: discovery at depth, table numbers recomputed independently, plots, CLI."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from demopsd.report.leakage import (
    DETAIL_QUANTITIES,
    HEADLINE_QUANTITIES,
    LEAKAGE_QUANTITIES,
    PLACEBO_QUANTITIES,
    has_heldout_probe,
    leakage_scalars,
)
from demopsd.report.plots import (
    collapse_curve_specs,
    plot_curves,
    probe_curve_specs,
    seed_band,
    smoothing_window,
    write_report,
)
from demopsd.report.runs import NoRunsError, Run, find_runs, resolve_column
from demopsd.report.tables import format_mean_se, mean_se, summarize
from tests.helpers import REPO_ROOT

DATASET = "sciknoweval-biology"
INDOMAIN = f"eval/{DATASET}/acc_avg@16"
GPQA = "eval/gpqa-diamond/acc_avg@16"
STEPS = 30
EVAL_STEPS = (9, 19, 29)
ENTROPY_LEVEL = {"demopsd": 1.4, "sdpo": 1.1, "opsd": 0.9, "grpo": 0.5,  # demopsd keeps entropy highest
                 "demopsd_placebo": 1.3}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SYNTHETIC = "synthetic-mixed"
UNINFERABLE = "eval/synthetic-uninferable/"
INFERABLE = "eval/synthetic-inferable/"
PROBE_METRICS = ("letter_confidence", "overconfidence", "letter_entropy", "letter_accuracy", "letter_p_answer",
                 "entropy")
PROBE_RISE = {"demopsd": 0.01, "sdpo": 0.05, "opsd": 0.03, "grpo": 0.0, "demopsd_placebo": 0.02}  # per evaluation
LETTER_METRICS = ("answer_top_share", "answer_letter_entropy", "probe_top_share")


def heldout_evals(method: str, rng: np.random.Generator) -> pd.DataFrame:
    """Eval rows of the synthetic task: both held-out sets at step 0 (change 0.0) and at every eval step."""
    steps = (0, *EVAL_STEPS)
    columns = {"step": steps}
    for prefix in (UNINFERABLE, INFERABLE):
        columns[prefix + "acc_avg@4"] = rng.uniform(0.2, 0.6, len(steps))
        columns[prefix + "acc_avg@1"] = rng.uniform(0.2, 0.6, len(steps))  # not the one used: @4 is larger
        columns[prefix + "pass@4"] = rng.uniform(0.4, 0.9, len(steps))
        columns[prefix + "distinct_answers@4"] = rng.uniform(1.0, 3.0, len(steps))
        columns[prefix + "format_rate"] = rng.uniform(0.4, 1.0, len(steps))
        for metric in LETTER_METRICS:
            columns[prefix + metric] = rng.uniform(0.25, 1.0, len(steps))
        for metric in PROBE_METRICS:
            change = PROBE_RISE[method] * np.arange(len(steps)) + np.r_[0.0, rng.normal(0, 0.02, len(steps) - 1)]
            columns[prefix + metric] = rng.uniform(0.3, 1.0) + change
            columns[prefix + metric + "_change"] = change
    return pd.DataFrame(columns)


def made_up_metrics(method: str, seed: int, nan_gaps: bool = False, heldout: bool = False) -> pd.DataFrame:
    """Lightning-like rows: one per step of train metrics, plus separate rows for the eval steps.

    ``heldout``: the eval rows are those of the synthetic task's two held-out sets instead.
    """
    rng = np.random.default_rng(100 * seed + len(method))
    steps = np.arange(STEPS)
    train = pd.DataFrame({
        "step": steps,
        "epoch": 0,
        "train/reward_mean": 0.2 + 0.015 * steps + rng.normal(0, 0.03, STEPS),
        "train/entropy": ENTROPY_LEVEL[method] * np.exp(-steps / 60) + rng.normal(0, 0.02, STEPS),
        "train/response_length": 200 + rng.normal(0, 10, STEPS),
    })
    if method != "grpo":
        train["distill/loss"] = 0.5 + rng.normal(0, 0.05, STEPS)
        train["distill/lambda_mean"] = 0.3 + 0.01 * steps
        train["leakage/kl_teacher_student"] = 0.8 - 0.01 * steps + rng.normal(0, 0.02, STEPS)
        train["leakage/kl_target_student"] = 0.3 - 0.004 * steps + rng.normal(0, 0.01, STEPS)
        train["leakage/attenuation"] = train["leakage/kl_target_student"] / train["leakage/kl_teacher_student"]
        train["distill/demonstration_fraction"] = rng.uniform(0, 1, STEPS)
    else:
        train["grpo/loss"] = rng.normal(0, 0.05, STEPS)
        train["grpo/varied_group_fraction"] = rng.uniform(0, 1, STEPS)
    if nan_gaps:  # missing values, the last entropy among them: final entropy is the last non-NaN one
        train.loc[[3, 4, 17, STEPS - 1], "train/entropy"] = np.nan
        if "leakage/kl_teacher_student" in train:
            train.loc[[5, 6, 7], "leakage/kl_teacher_student"] = np.nan
    if heldout:
        return pd.concat([train, heldout_evals(method, rng)], ignore_index=True)
    evals = pd.DataFrame({
        "step": EVAL_STEPS,
        INDOMAIN: [0.30 + 0.05 * i + rng.uniform(0, 0.1) for i in range(len(EVAL_STEPS))],
        f"eval/{DATASET}/acc_avg@1": rng.uniform(0, 1, len(EVAL_STEPS)),  # not the one used: @16 is larger
        GPQA: rng.uniform(0.2, 0.35, len(EVAL_STEPS)),
    })
    return pd.concat([train, evals], ignore_index=True)


def write_run(run_dir: Path, method: str, seed: int, dataset: str = DATASET, **kwargs) -> Path:
    run_dir.mkdir(parents=True)
    cfg = {"method": {"name": method}, "data": {"name": dataset}, "seed": seed, "run_name": f"{method}-s{seed}"}
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config_resolved.yaml")
    made_up_metrics(method, seed, **kwargs).to_csv(run_dir / "metrics.csv", index=False)
    return run_dir


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """2 methods x 2 seeds in a Hydra-like multirun folder (one run with NaN gaps), plus a single-seed opsd run."""
    root = tmp_path_factory.mktemp("outputs")
    multirun = root / "multirun" / "2025-01-01" / "12-00-00"
    write_run(multirun / "0", "demopsd", 0)
    write_run(multirun / "1", "demopsd", 1, nan_gaps=True)
    write_run(multirun / "2", "grpo", 0)
    write_run(multirun / "3", "grpo", 1)
    write_run(root / "single" / "opsd", "opsd", 0)
    (multirun / "4").mkdir()  # an unfinished job: metrics but no config -> not a run
    made_up_metrics("grpo", 2).to_csv(multirun / "4" / "metrics.csv", index=False)
    return root


@pytest.fixture(scope="module")
def report(runs_root, tmp_path_factory):
    return write_report([runs_root], tmp_path_factory.mktemp("report"))


def runs_of(root: Path, method: str) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.csv")
                  if (p.parent / "config_resolved.yaml").exists()
                  and OmegaConf.load(p.parent / "config_resolved.yaml").method.name == method)


def expected(root: Path, method: str, per_seed) -> tuple[float, float, int]:
    """Mean and s.e. over seeds, recomputed with plain pandas / numpy from the CSVs."""
    values = []
    for run in runs_of(root, method):
        value = per_seed(pd.read_csv(run / "metrics.csv").sort_values("step"))
        if not math.isnan(value):
            values.append(value)
    n = len(values)
    se = float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else math.nan
    return (float(np.mean(values)) if n else math.nan), se, n


def last_of(column):
    return lambda df: df[column].dropna().iloc[-1] if column in df and df[column].notna().any() else math.nan


def at_last_evaluation(column):
    """The value at the last step that logged any ``eval/`` metric, NaN where that evaluation left ``column`` out."""
    def value(df):
        evaluated = df[df.filter(regex="^eval/").notna().any(axis=1)]
        return evaluated[column].iloc[-1] if column in df and len(evaluated) else math.nan
    return value


def first_of(column):
    return lambda df: df[column].dropna().iloc[0] if column in df and df[column].notna().any() else math.nan


def change_of(column):
    return lambda df: last_of(column)(df) - first_of(column)(df)


def best_of(column):
    return lambda df: df[column].max() if column in df else math.nan


def mean_of(column):
    return lambda df: df[column].mean() if column in df else math.nan


PER_SEED = {
    "indomain_best": best_of(INDOMAIN),
    "indomain_final": last_of(INDOMAIN),
    "gpqa_best": best_of(GPQA),
    "gpqa_final": last_of(GPQA),
    "entropy_final": last_of("train/entropy"),
    "leakage_mean": mean_of("leakage/kl_teacher_student"),
}


# --------------------------------------------------------------------------- discovery


def test_find_runs_at_any_depth_reads_method_dataset_seed(runs_root):
    runs = find_runs(runs_root)
    expected_runs = [("demopsd", 0), ("demopsd", 1), ("grpo", 0), ("grpo", 1), ("opsd", 0)]
    assert sorted((r.method, r.seed) for r in runs) == expected_runs
    assert {r.dataset for r in runs} == {DATASET}
    assert all((r.path / "config_resolved.yaml").exists() for r in runs)
    # a run directory itself, and overlapping paths, are found once
    single = runs_root / "single" / "opsd"
    assert [r.path for r in find_runs([single, runs_root / "single"])] == [single.resolve()]


def test_metrics_rows_of_one_step_are_merged(runs_root):
    run = next(r for r in find_runs(runs_root) if r.method == "demopsd" and r.seed == 0)
    assert run.metrics.index.is_unique and list(run.metrics.index) == list(range(STEPS))
    assert run.metrics.loc[9, INDOMAIN] == pytest.approx(pd.read_csv(run.path / "metrics.csv")[INDOMAIN].dropna().iloc[0])
    assert not math.isnan(run.metrics.loc[9, "train/entropy"])


def test_no_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoRunsError, match="no run directories.*empty"):
        find_runs([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="missing"):
        find_runs(tmp_path / "missing")


# --------------------------------------------------------------------------- table


@pytest.mark.parametrize("method", ["demopsd", "grpo"])
@pytest.mark.parametrize("quantity", list(PER_SEED))
def test_table_numbers_equal_an_independent_recomputation(runs_root, report, method, quantity):
    table = pd.read_csv(report.table_csv)
    row = table[(table.dataset == DATASET) & (table.method == method)].iloc[0]
    mean, se, n = expected(runs_root, method, PER_SEED[quantity])
    assert row.seeds == 2 and row[f"{quantity}_n"] == n
    if n == 0:  # grpo has no leakage
        assert math.isnan(row[f"{quantity}_mean"])
        return
    assert n == 2
    assert row[f"{quantity}_mean"] == pytest.approx(mean, rel=1e-9)
    assert row[f"{quantity}_se"] == pytest.approx(se, rel=1e-9)
    assert f"{mean:.3f} ± {se:.3f}" in report.table_md.read_text()


def test_markdown_rows_absent_values_and_order(report):
    lines = [line for line in report.table_md.read_text().splitlines() if line.startswith(f"| {DATASET}")]
    assert [line.split(" | ")[1] for line in lines] == ["demopsd", "opsd", "grpo"]  # fixed method order
    grpo = lines[2].strip("| ").split(" | ")
    assert grpo[-1] == "—"  # no leakage for grpo
    assert "`eval/sciknoweval-biology/acc_avg@16`" in report.table_md.read_text()


def test_single_seed_shows_the_mean_without_a_standard_error(runs_root, report):
    table = pd.read_csv(report.table_csv)
    row = table[table.method == "opsd"].iloc[0]
    assert row.seeds == 1 and math.isnan(row.entropy_final_se)
    entropy = last_of("train/entropy")(pd.read_csv(runs_root / "single" / "opsd" / "metrics.csv"))
    assert row.entropy_final_mean == pytest.approx(entropy)
    assert f"{entropy:.3f} ± —" in report.table_md.read_text()


def test_mean_se_and_formatting():
    assert mean_se([1.0, 3.0, math.nan]) == pytest.approx((2.0, 1.0, 2))  # std(ddof=1)=sqrt(2), /sqrt(2)
    mean, se, n = mean_se([0.5])
    assert (mean, n) == (0.5, 1) and math.isnan(se)
    assert format_mean_se(0.4123, 0.0131) == "0.412 ± 0.013"
    assert format_mean_se(0.4123, math.nan) == "0.412 ± —"
    assert format_mean_se(math.nan, math.nan) == "—"
    assert format_mean_se(0.00123, 0.0004) == "0.00123 ± 0.00040"  # small values keep 3 significant digits


def test_summarize_separates_datasets(runs_root, tmp_path):
    write_run(tmp_path / "chem", "demopsd", 0, dataset="sciknoweval-chemistry")
    table = summarize(find_runs([runs_root, tmp_path]))
    assert list(zip(table.dataset, table.method)) == [
        (DATASET, "demopsd"), (DATASET, "opsd"), (DATASET, "grpo"), ("sciknoweval-chemistry", "demopsd")]
    chem = table.iloc[-1]
    assert chem.seeds == 1 and chem.indomain_best_n == 0  # its eval columns are biology's: not in-domain
    assert chem.gpqa_best_n == 1


# --------------------------------------------------------------------------- leakage table (synthetic task)


LEAKAGE_PER_SEED = {
    "uninferable_confidence_change": at_last_evaluation(UNINFERABLE + "letter_confidence_change"),
    "inferable_confidence_change": at_last_evaluation(INFERABLE + "letter_confidence_change"),
    "uninferable_accuracy_change": change_of(UNINFERABLE + "acc_avg@4"),
    "uninferable_overconfidence_change": at_last_evaluation(UNINFERABLE + "overconfidence_change"),
    "uninferable_letter_entropy_change": at_last_evaluation(UNINFERABLE + "letter_entropy_change"),
    "uninferable_letter_accuracy_change": at_last_evaluation(UNINFERABLE + "letter_accuracy_change"),
    "inferable_sampled_accuracy": at_last_evaluation(INFERABLE + "acc_avg@4"),
    "inferable_accuracy_change": change_of(INFERABLE + "acc_avg@4"),
    "inferable_sampled_accuracy_start": first_of(INFERABLE + "acc_avg@4"),
    "uninferable_sampled_accuracy": at_last_evaluation(UNINFERABLE + "acc_avg@4"),
    "inferable_format_rate": at_last_evaluation(INFERABLE + "format_rate"),
    "uninferable_format_rate": at_last_evaluation(UNINFERABLE + "format_rate"),
    "uninferable_answer_top_share_start": first_of(UNINFERABLE + "answer_top_share"),
    **{f"{kind}_{key}": at_last_evaluation(prefix + column)
       for kind, prefix in (("inferable", INFERABLE), ("uninferable", UNINFERABLE))
       for key, column in (("pass_at_k", "pass@4"), ("distinct_answers", "distinct_answers@4"),
                           ("answer_top_share", "answer_top_share"), ("answer_letter_entropy", "answer_letter_entropy"),
                           ("probe_top_share", "probe_top_share"))},
    "inferable_letter_accuracy_change": at_last_evaluation(INFERABLE + "letter_accuracy_change"),
    "uninferable_entropy_change": at_last_evaluation(UNINFERABLE + "entropy_change"),
    "inferable_entropy_change": at_last_evaluation(INFERABLE + "entropy_change"),
    "entropy_final": last_of("train/entropy"),
    "reward_mean": mean_of("train/reward_mean"),
    "demonstration_fraction_mean": mean_of("distill/demonstration_fraction"),
    "varied_group_fraction_mean": mean_of("grpo/varied_group_fraction"),
    "kl_teacher_student_mean": mean_of("leakage/kl_teacher_student"),
    "kl_target_student_mean": mean_of("leakage/kl_target_student"),
    "attenuation_mean": mean_of("leakage/attenuation"),
}
TEACHER_ONLY = ("kl_teacher_student_mean", "kl_target_student_mean", "attenuation_mean",
                "demonstration_fraction_mean")
GRPO_ONLY = ("varied_group_fraction_mean",)


def absent(method: str, key: str) -> bool:
    """Whether ``method``'s runs do not log the column of ``key``."""
    return key in TEACHER_ONLY if method == "grpo" else key in GRPO_ONLY


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """Synthetic-task runs: demopsd x 3 seeds (one whose last evaluation left the uninferable confidence out),
    grpo x 2, sdpo x 1; plus an opsd run on another dataset without the held-out probe."""
    root = tmp_path_factory.mktemp("synthetic")
    for method, seeds in (("demopsd", 3), ("grpo", 2), ("sdpo", 1)):
        for seed in range(seeds):
            write_run(root / f"{method}-{seed}", method, seed, SYNTHETIC, nan_gaps=seed == 2, heldout=True)
    frame = pd.read_csv(root / "demopsd-2" / "metrics.csv")
    frame.loc[frame.step == EVAL_STEPS[-1], UNINFERABLE + "letter_confidence_change"] = np.nan
    frame.to_csv(root / "demopsd-2" / "metrics.csv", index=False)
    write_run(root / "opsd-0", "opsd", 0)
    return root


@pytest.fixture(scope="module")
def synthetic_report(synthetic_root, tmp_path_factory):
    return write_report(synthetic_root, tmp_path_factory.mktemp("synthetic_report"))


def test_leakage_scalars_are_the_last_and_mean_values_of_each_run(synthetic_root):
    assert set(LEAKAGE_PER_SEED) == set(LEAKAGE_QUANTITIES)
    runs = find_runs(synthetic_root)
    assert [r.method for r in runs if not has_heldout_probe(r)] == ["opsd"]
    for run in (r for r in runs if has_heldout_probe(r)):
        frame = pd.read_csv(run.path / "metrics.csv").sort_values("step")
        values = leakage_scalars(run)
        assert (values["method"], values["seed"], values["dataset"]) == (run.method, run.seed, SYNTHETIC)
        for key, per_seed in LEAKAGE_PER_SEED.items():
            if absent(run.method, key):
                assert math.isnan(values[key]), key
            else:
                assert values[key] == pytest.approx(per_seed(frame), rel=1e-12, nan_ok=True), (run.name, key)
    lost = leakage_scalars(next(r for r in runs if r.name == "demopsd-s2"))["uninferable_confidence_change"]
    assert math.isnan(lost)  # missing at the last evaluation, not the value of an earlier one


@pytest.mark.parametrize("method, seeds", [("demopsd", 3), ("grpo", 2)])
@pytest.mark.parametrize("quantity", list(LEAKAGE_PER_SEED))
def test_leakage_table_equals_an_independent_recomputation(synthetic_root, synthetic_report, method, seeds, quantity):
    table = pd.read_csv(synthetic_report.leakage_csv)
    row = table[table.method == method].iloc[0]
    mean, se, n = expected(synthetic_root, method, LEAKAGE_PER_SEED[quantity])
    assert row.dataset == SYNTHETIC and row.seeds == seeds and row[f"{quantity}_n"] == n
    if absent(method, quantity):
        assert n == 0 and math.isnan(row[f"{quantity}_mean"]) and math.isnan(row[f"{quantity}_se"])
        return
    left_out = method == "demopsd" and quantity == "uninferable_confidence_change"  # by seed 2's last evaluation
    assert n == seeds - left_out
    assert row[f"{quantity}_mean"] == pytest.approx(mean, rel=1e-9)
    assert row[f"{quantity}_se"] == pytest.approx(se, rel=1e-9)
    assert format_mean_se(mean, se) in synthetic_report.leakage_md.read_text()
    per_seed = pd.read_csv(synthetic_report.out_dir / "leakage_runs.csv")
    assert per_seed[per_seed.method == method][quantity].mean() == pytest.approx(mean, rel=1e-9)


def cells(line: str) -> list[str]:
    return line.strip("| ").split(" | ")


def test_leakage_markdown_headline_and_second_table_rows_legend_and_absent_leakage(synthetic_report):
    text = synthetic_report.leakage_md.read_text()
    headline, detail = text.split("\n## ")
    rows = {cells(line)[1]: cells(line) for line in headline.splitlines() if line.startswith(f"| {SYNTHETIC}")}
    assert list(rows) == ["demopsd", "sdpo", "grpo"]  # fixed method order; opsd has no held-out probe
    header = cells(next(line for line in headline.splitlines() if line.startswith("| dataset")))
    assert header[3:] == [q.header for q in HEADLINE_QUANTITIES.values()] and len(header) <= 8
    assert all(" ± " in cell for row in rows.values() for cell in row[3:])

    # the second table: a row per quantity, a column per method
    table = [cells(line) for line in detail.splitlines() if line.startswith("| ")]
    assert table[0] == ["quantity", "demopsd", "sdpo", "grpo"] and table[1] == ["seeds", "3", "1", "2"]
    by_header = {row[0]: row[1:] for row in table[2:]}
    assert list(by_header) == [q.header for q in DETAIL_QUANTITIES.values()]
    for key in TEACHER_ONLY:
        demopsd, sdpo, grpo = by_header[LEAKAGE_QUANTITIES[key].header]
        assert " ± " in demopsd and grpo == "—"
    for key in GRPO_ONLY:
        assert by_header[LEAKAGE_QUANTITIES[key].header][0] == "—"
    assert all(row[1].endswith(" ± —") for header, row in by_header.items()
               if header not in {LEAKAGE_QUANTITIES[k].header for k in GRPO_ONLY})  # sdpo: one seed
    for quantity in LEAKAGE_QUANTITIES.values():
        assert f"- **{quantity.header}**: {quantity.legend}" in text
    assert "a rise without an accuracy rise is leakage" in text


def test_placebo_controlled_leakage_is_a_difference_in_differences_paired_by_seed(tmp_path):
    """Per seed, real minus placebo on each kind of question, then uninferable minus inferable; a run without its
    placebo partner of the same seed (demopsd seed 2) is left out; mean ± s.e. over the seeds in leakage.md."""
    for method, seeds in (("demopsd", 3), ("demopsd_placebo", 2), ("grpo", 1)):
        for seed in range(seeds):
            write_run(tmp_path / "runs" / f"{method}-{seed}", method, seed, SYNTHETIC, heldout=True)
    files = write_report(tmp_path / "runs", tmp_path / "report")
    differences = pd.read_csv(tmp_path / "report" / "leakage_placebo.csv")
    frames = {(m, s): pd.read_csv(tmp_path / "runs" / f"{m}-{s}" / "metrics.csv") for m, s in
              (("demopsd", 0), ("demopsd", 1), ("demopsd_placebo", 0), ("demopsd_placebo", 1))}

    def did(seed: int, uninferable, inferable) -> float:
        real, placebo = frames["demopsd", seed], frames["demopsd_placebo", seed]
        return (uninferable(real) - uninferable(placebo)) - (inferable(real) - inferable(placebo))

    expected = {
        "confidence_change": [did(s, last_of(UNINFERABLE + "letter_confidence_change"),
                                  last_of(INFERABLE + "letter_confidence_change")) for s in (0, 1)],
        "accuracy_change": [did(s, change_of(UNINFERABLE + "acc_avg@4"), change_of(INFERABLE + "acc_avg@4"))
                            for s in (0, 1)],
    }
    assert set(differences["method"]) == {"demopsd"} and sorted(differences["seed"]) == [0, 0, 1, 1]
    for quantity, values in expected.items():
        rows = differences[differences.quantity == quantity].sort_values("seed")
        assert rows["difference_in_differences"].tolist() == pytest.approx(values, rel=1e-12)
        assert (rows["uninferable"] - rows["inferable"]).tolist() == pytest.approx(values, rel=1e-12)
        line = next(line for line in files.leakage_md.read_text().splitlines()
                    if line.startswith(f"| {SYNTHETIC} | demopsd | 2 | {PLACEBO_QUANTITIES[quantity]} |"))
        assert cells(line)[-1] == format_mean_se(*mean_se(values)[:2])


def test_columns_of_k_are_the_runs_largest_k():
    columns = ["eval/x/acc_avg@1", "eval/x/acc_avg@16", "eval/x/acc_avg@4", "eval/y/acc_avg@32", "eval/x/pass@64"]
    assert resolve_column(columns, "eval/x/acc_avg@{k}") == "eval/x/acc_avg@16"
    assert resolve_column(columns, "eval/z/acc_avg@{k}") == "eval/z/acc_avg@{k}"  # none: no data, a NaN
    assert resolve_column(columns, "eval/x/format_rate") == "eval/x/format_rate"


def test_heldout_probe_plot_and_leakage_table_only_with_the_probe(runs_root, synthetic_root, synthetic_report, report):
    [spec] = probe_curve_specs(find_runs(synthetic_root))
    assert spec.columns == (UNINFERABLE + "letter_confidence_change", UNINFERABLE + "overconfidence_change")
    probe = synthetic_report.out_dir / "heldout_probe.png"
    assert probe in synthetic_report.plots and synthetic_report.skipped == []
    assert_png(probe)
    assert synthetic_report.leakage_md == synthetic_report.out_dir / "leakage.md"
    assert probe_curve_specs(find_runs(runs_root)) == []
    collapse, diversity = collapse_curve_specs(find_runs(synthetic_root))
    assert collapse.columns == (INFERABLE + "answer_top_share", UNINFERABLE + "answer_top_share")
    assert diversity.columns == (INFERABLE + "distinct_answers@4", UNINFERABLE + "distinct_answers@4")
    for name in ("heldout_collapse.png", "heldout_diversity.png"):
        assert_png(synthetic_report.out_dir / name)
    assert collapse_curve_specs(find_runs(runs_root)) == []
    assert "heldout_probe.png" not in {p.name for p in report.plots}
    assert report.leakage_md is None and report.leakage_csv is None
    assert not (report.out_dir / "leakage.md").exists() and not (report.out_dir / "leakage.csv").exists()


# --------------------------------------------------------------------------- plots and CLI


def test_seed_band_fills_inner_gaps_and_aggregates_mean_se():
    def run(name, values):
        metrics = pd.DataFrame({"x": values}, index=pd.Index(range(len(values)), name="step"))
        return Run(Path(name), "demopsd", DATASET, 0, name, metrics)

    runs = [run("a", [1.0, np.nan, 3.0, 4.0]), run("b", [3.0, 4.0, 5.0, np.nan])]
    band = seed_band(runs, "x")
    assert list(band["mean"]) == pytest.approx([2.0, 3.0, 4.0, 4.0])  # a's gap at step 1 interpolated to 2.0
    assert band["se"].iloc[0] == pytest.approx(np.std([1.0, 3.0], ddof=1) / np.sqrt(2))
    assert list(band["n"]) == [2, 2, 2, 1] and math.isnan(band["se"].iloc[3])  # b ended: no band, not filled
    smooth = seed_band(runs[:1], "x", window=3)
    assert smooth["mean"].iloc[1] == pytest.approx(2.0) and smooth["mean"].iloc[0] == pytest.approx(1.5)
    assert smoothing_window(runs, ["x"]) == 1




def assert_png(path: Path, min_bytes: int = 10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, path


def test_plots_are_written_as_png(report):
    names = {p.name for p in report.plots}
    assert {"entropy.png", "leakage.png", "lambda.png", "reward.png",
            "eval_sciknoweval-biology_acc_avg_16.png", "eval_gpqa-diamond_acc_avg_16.png"} <= names
    for path in report.plots:
        assert path.parent == report.out_dir
        assert_png(path)
    assert report.skipped == []


def test_plots_without_their_columns_are_skipped(runs_root, tmp_path):
    grpo_only = [r for r in find_runs(runs_root) if r.method == "grpo"]
    written = plot_curves(grpo_only, tmp_path)
    assert {p.name for p in written} >= {"entropy.png", "reward.png"}
    assert not {"leakage.png", "lambda.png"} & {p.name for p in written}
    report = write_report(runs_root / "multirun" / "2025-01-01" / "12-00-00" / "2", tmp_path / "one")
    assert any(line.startswith("leakage:") for line in report.skipped)
    assert any(line.startswith("lambda:") for line in report.skipped)


def test_cli_writes_the_report_and_says_where(runs_root, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "src/report.py", str(runs_root), "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    for name in ("results.md", "results.csv", "runs.csv", "entropy.png"):
        assert (out / name).is_file(), name
    assert_png(out / "entropy.png")
    assert "leakage table" not in done.stdout


def test_cli_names_the_leakage_table(synthetic_root, tmp_path):
    done = subprocess.run([sys.executable, "src/report.py", str(synthetic_root), "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "  leakage table: leakage.md, leakage.csv" in done.stdout and "heldout_probe.png" in done.stdout
    assert (tmp_path / "leakage.md").is_file() and (tmp_path / "leakage.csv").is_file()


def test_cli_without_runs_fails_clearly(tmp_path):
    done = subprocess.run([sys.executable, "src/report.py", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no run directories" in done.stderr and str(tmp_path) in done.stderr
    assert not (tmp_path / "report").exists()
