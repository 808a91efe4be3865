"""Evaluation summaries, result files and settings (the generation itself is covered by the smoke tests)."""

import json

import pytest

from demopsd.evaluation import EvalConfig, EvalResult, summarize, write_results


def record(idx, answer, letters, greedy=None, length=10):
    samples = [{"text": "", "predicted": p, "correct": p == answer, "well_formed": p is not None, "length": length}
               for p in letters]
    out = {"idx": idx, "answer": answer, "samples": samples}
    if greedy is not None:
        out["greedy"] = {"text": "", "predicted": greedy, "correct": greedy == answer, "well_formed": True, "length": 3}
    return out


def test_summary_by_hand():
    # q0: 1 of 4 correct, one malformed; q1: 4 of 4 correct.
    samples = [record(0, "A", ["A", "B", None, "C"], greedy="B"), record(1, "D", ["D"] * 4, greedy="D", length=20)]
    metrics = summarize("bio", samples, k=2, entropy=0.7)
    assert metrics["eval/bio/acc_avg@2"] == pytest.approx((1 / 4 + 1) / 2)
    assert metrics["eval/bio/pass@2"] == pytest.approx((0.5 + 1) / 2)  # 1 - C(3,2)/C(4,2) = 0.5
    assert metrics["eval/bio/format_rate"] == pytest.approx(7 / 8)
    assert metrics["eval/bio/greedy_accuracy"] == pytest.approx(0.5)
    assert metrics["eval/bio/response_length"] == pytest.approx(15)
    assert metrics["eval/bio/entropy"] == pytest.approx(0.7)
    assert metrics["eval/bio/num_questions"] == 2


def test_without_greedy_answers_there_is_no_greedy_metric():
    metrics = summarize("x", [record(0, "A", ["A", "B"])], k=2, entropy=0.0)
    assert "eval/x/greedy_accuracy" not in metrics and metrics["eval/x/acc_avg@2"] == 0.5


def test_results_are_written_as_json(tmp_path):
    config = EvalConfig(k=2)
    results = [EvalResult("a", {"eval/a/acc_avg@2": 0.5}, [record(3, "A", ["A", "B"])]),
               EvalResult("b", {"eval/b/acc_avg@2": 1.0}, [record(4, "B", ["B", "B"]), record(5, "C", ["C", "C"])])]
    write_results(results, tmp_path / "out", config, step=7)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["step"] == 7 and summary["config"]["k"] == 2
    assert summary["metrics"] == {"eval/a/acc_avg@2": 0.5, "eval/b/acc_avg@2": 1.0}
    lines = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["idx"]) for r in lines] == [("a", 3), ("b", 4), ("b", 5)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["samples.jsonl", "summary.json"]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0}, "eval.k=0"), ({"batch_size": 0}, "eval.batch_size=0"), ({"max_examples": 0}, "eval.max_examples=0"),
     ({"temperature": 0.0}, "temperature=0.0"), ({"top_p": 1.5}, "top_p=1.5")],
)
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)
