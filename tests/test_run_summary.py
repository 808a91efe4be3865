import pandas as pd
import pytest

from demopsd.report.summary import run_summary
from tests.test_sweep_report import QUESTIONS, samples, write_jsonl


def test_summary_reports_first_and_last_evaluation_training_entropy_and_mean_leakage(tmp_path):
    rows = [
        {"step": 0, "eval/synthetic-uninferable/letter_confidence": 0.50, "eval/synthetic-uninferable/entropy": 2.0,
         "eval/synthetic-uninferable/acc_avg@1": 0.25, "eval/synthetic-uninferable/format_rate": 0.5},
        {"step": 0, "train/entropy": 2.2, "leakage/kl_teacher_student": 0.10, "leakage/kl_target_student": 0.02,
         "train/reward_mean": 0.25, "distill/demonstration_fraction": 0.5},
        {"step": 1, "train/entropy": 2.6, "leakage/kl_teacher_student": 0.30, "leakage/kl_target_student": 0.04,
         "train/reward_mean": 0.75, "distill/demonstration_fraction": 1.0},
        {"step": 2, "eval/synthetic-uninferable/letter_confidence": 0.65, "eval/synthetic-uninferable/entropy": 1.5,
         "eval/synthetic-uninferable/acc_avg@1": 0.5, "eval/synthetic-uninferable/format_rate": 0.75},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)

    summary = run_summary(tmp_path / "metrics.csv", tmp_path / "report").splitlines()

    assert summary[1] == ("  synthetic-uninferable (step 0 → 2): accuracy 0.250 → 0.500 (+0.250), "
                          "well-formed 0.500 → 0.750 (+0.250), letter confidence 0.500 → 0.650 (+0.150), "
                          "response entropy 2.000 → 1.500 (-0.500)")
    assert summary[2] == "  training entropy: 2.200 at the first step → 2.600 at the last"
    assert summary[3] == "  rollouts, mean over training: reward 0.500, context a successful sibling 0.750"
    assert summary[4] == "  mean per token over training: KL(teacher‖student) 0.2000, KL(target‖student) 0.0300"
    assert summary[5] == f"Plots and tables: {tmp_path / 'report'}"


def test_a_run_without_evaluation_or_distillation_prints_nothing(tmp_path):
    pd.DataFrame([{"step": 0, "perf/step_seconds": 3.0}]).to_csv(tmp_path / "metrics.csv", index=False)
    assert run_summary(tmp_path / "metrics.csv") == ""


def test_accuracy_carries_its_standard_error_over_questions_when_logged(tmp_path):
    rows = [
        {"step": 0, "eval/synthetic-inferable/acc_avg@4": 0.25, "eval/synthetic-inferable/acc_avg_se@4": 0.04},
        {"step": 12, "eval/synthetic-inferable/acc_avg@4": 0.375, "eval/synthetic-inferable/acc_avg_se@4": 0.05},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    verdict, _, line = run_summary(tmp_path / "metrics.csv").splitlines()
    assert line == "  synthetic-inferable (step 0 → 12): accuracy 0.250 ± 0.040 → 0.375 ± 0.050 (+0.125)"
    assert verdict == ("Training changed no held-out accuracy by 2 standard errors or more: synthetic-inferable "
                       "unchanged, accuracy 0.250 → 0.375 (+0.125 ± 0.064 unpaired s.e.)")  # 0.125 < 2 × 0.064


def test_the_first_line_says_when_training_made_the_model_worse_lost_the_format_and_collapsed(tmp_path):
    """Judged on the per-question (paired) change where the evaluations' samples are there: here every question
    loses one of its four correct answers (a change of -0.25 with no spread), more than any unpaired s.e."""
    start = [True] * 2 + [False] * 2
    end = [True] + [False] * 3
    write_jsonl(tmp_path / "eval" / "step000000" / "samples.jsonl", samples(start * QUESTIONS))
    write_jsonl(tmp_path / "eval" / "step000008" / "samples.jsonl", samples(end * QUESTIONS))
    inferable = "eval/synthetic-inferable/"
    rows = [{"step": step, **{inferable + key: value for key, value in zip(
                ("acc_avg@4", "acc_avg_se@4", "format_rate", "answer_top_share"), values)}}
            for step, values in ((0, (0.5, 0.2, 1.0, 0.3)), (8, (0.25, 0.2, 0.5, 0.95)))]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    first = run_summary(tmp_path / "metrics.csv").splitlines()[0]
    assert first == ("Training made the model worse: synthetic-inferable worse, accuracy 0.500 → 0.250 (-0.250 ± "
                     "0.000 paired s.e.); it lost the answer format on synthetic-inferable "
                     "(well-formed 1.00 → 0.50); it collapsed onto one answer letter on synthetic-inferable "
                     "(top letter's share 0.30 → 0.95)")


@pytest.mark.parametrize("end, first_line", [
    ({"acc_avg@4": 0.25, "answer_top_share": 0.8, "format_rate": 1.0},  # a collapse is damage whatever the accuracy
     "Training damaged the model's answers: x unchanged, accuracy 0.250 → 0.250 (+0.000 ± 0.042 unpaired s.e.); "
     "it collapsed onto one answer letter on x (top letter's share 0.40 → 0.80)"),
    ({"acc_avg@4": 0.40, "answer_top_share": 0.5, "format_rate": 0.95},  # up two s.e., format and letters kept
     "Training helped: x better, accuracy 0.250 → 0.400 (+0.150 ± 0.042 unpaired s.e.)"),
])
def test_help_and_damage_in_the_first_line(tmp_path, end, first_line):
    start = {"acc_avg@4": 0.25, "answer_top_share": 0.4, "format_rate": 1.0}
    rows = [{"step": step, "eval/x/acc_avg_se@4": 0.03, **{f"eval/x/{k}": v for k, v in values.items()}}
            for step, values in ((0, start), (8, end))]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    assert run_summary(tmp_path / "metrics.csv").splitlines()[0] == first_line


def test_a_last_evaluation_that_names_no_letter_is_not_judged_by_an_earlier_ones_collapse(tmp_path):
    """The last evaluation's answers name no letter (no top answer share logged): the line says the format was lost,
    not that the answers collapsed, which only the evaluation before it showed."""
    values = ((0, 0.25, 1.0, 0.4), (4, 0.25, 1.0, 0.9), (8, 0.0, 0.0, None))
    rows = [{"step": step, "eval/x/acc_avg_se@4": 0.03, "eval/x/acc_avg@4": accuracy, "eval/x/format_rate": formed,
             "eval/x/answer_top_share": top} for step, accuracy, formed, top in values]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    assert run_summary(tmp_path / "metrics.csv").splitlines()[0] == (
        "Training made the model worse: x worse, accuracy 0.250 → 0.000 (-0.250 ± 0.042 unpaired s.e.); "
        "it lost the answer format on x (well-formed 1.00 → 0.00)")


def test_a_run_that_did_not_evaluate_its_start_is_judged_from_its_first_evaluation_and_says_so(tmp_path):
    rows = [{"step": step, "eval/x/acc_avg@4": 0.4, "eval/x/acc_avg_se@4": 0.03} for step in (12, 24)]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    assert run_summary(tmp_path / "metrics.csv").splitlines()[0] == (
        "Training from step 12 to 24 (the start was not evaluated) changed no held-out accuracy by 2 standard errors "
        "or more: x unchanged, accuracy 0.400 → 0.400 (+0.000 ± 0.042 unpaired s.e.)")
