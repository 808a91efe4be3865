"""Evaluation summaries, result files and settings (the generation itself is covered by the smoke tests)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from demopsd.config.settings import EvalConfig, SettingError
from demopsd.data.types import MCQExample
from demopsd.evaluation.evaluate import (
    EvalResult,
    answer_letter_probs,
    letter_metrics,
    single_token_id,
    summarize,
    write_results,
)
from demopsd.evaluation.metrics import changes_from
from demopsd.rollout.batch import PromptBatch
from tests.helpers import tiny_llama


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
    # letters A, B, C, D, D, D, D (one answer names none); two of q0's letters in 2 draws: 3 × pass(4, 1, 2) = 1.5
    assert metrics["eval/bio/answer_top_share"] == pytest.approx(4 / 7)
    entropy = -(3 / 7 * math.log(1 / 7) + 4 / 7 * math.log(4 / 7))
    assert metrics["eval/bio/answer_letter_entropy"] == pytest.approx(entropy)
    assert metrics["eval/bio/distinct_answers@2"] == pytest.approx((1.5 + 1) / 2)
    assert "eval/bio/num_probed" not in metrics and "eval/bio/letter_entropy" not in metrics  # no record was probed


def test_answered_and_probed_questions_are_summarised_apart():
    """Questions only probed add to the probe's metrics and nothing else; questions only answered the reverse."""
    probe = {"A": 0.1, "B": 0.6, "C": 0.2, "D": 0.1}
    answered_and_probed = {**record(0, "B", ["B", "B"], greedy="B"), "letter_probs": probe}
    answered = record(1, "A", ["C", "C"], greedy="A")
    probed = [{"idx": i, "answer": "A", "letter_probs": {"A": 0.7, "B": 0.1, "C": 0.1, "D": 0.1}} for i in (2, 3)]
    metrics = summarize("x", [answered_and_probed, answered, *probed], k=2, entropy=0.0)
    assert metrics["eval/x/num_questions"] == 2 and metrics["eval/x/num_probed"] == 3
    assert metrics["eval/x/acc_avg@2"] == 0.5 and metrics["eval/x/greedy_accuracy"] == 1.0
    assert metrics["eval/x/answer_top_share"] == 0.5 and metrics["eval/x/distinct_answers@2"] == 1.0
    # the probe's preferred letters B, A, A: all right, two of three the most common one
    assert metrics["eval/x/letter_accuracy"] == 1.0 and metrics["eval/x/probe_top_share"] == pytest.approx(2 / 3)
    assert metrics["eval/x/letter_confidence"] == pytest.approx((0.6 + 0.7 + 0.7) / 3)


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
     ({"temperature": 0.0}, "eval.temperature=0.0"), ({"top_p": 1.5}, "eval.top_p=1.5"),
     ({"probe_examples": 0}, "eval.probe_examples=0 is invalid: null .* or at least 1"),
     ({"probe": False, "probe_examples": 8}, "eval.probe_examples=8 is invalid: null while eval.probe is false")],
)
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises(SettingError, match=message):
        EvalConfig(**kwargs)


def test_every_broken_setting_is_reported_at_once_under_the_eval_keys():
    with pytest.raises(SettingError) as caught:
        EvalConfig(k=0, top_p=2.0, batch_size=0, chunk_size=0)
    assert caught.value.section == "eval"
    assert [name for name, _, _ in caught.value.problems] == ["k", "top_p", "batch_size", "chunk_size"]


@pytest.mark.parametrize(
    "kwargs, answered, probed",
    [({}, [5, 300], [5, 300]), ({"max_examples": 64}, [5, 64], [5, 64]),
     ({"max_examples": 64, "probe_examples": 200}, [5, 64], [5, 200]),
     ({"max_examples": 64, "probe_examples": 16}, [5, 64], [5, 16]), ({"probe_examples": 16}, [5, 300], [5, 16]),
     ({"max_examples": 64, "probe": False}, [5, 64], [0, 0])],
)
def test_how_many_questions_are_answered_and_probed(kwargs, answered, probed):
    config = EvalConfig(**kwargs)
    assert [config.answered(n) for n in (5, 300)] == answered
    assert [config.probed(n) for n in (5, 300)] == probed


def test_letter_metrics_by_hand():
    samples = [{"answer": "B", "letter_probs": {"A": 0.7, "B": 0.1, "C": 0.1, "D": 0.1}},
               {"answer": "A", "letter_probs": {"A": 0.5, "B": 0.5}}]
    metrics = letter_metrics(samples)
    first_entropy = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert metrics["letter_entropy"] == pytest.approx((first_entropy + math.log(2)) / 2)
    assert metrics["letter_confidence"] == pytest.approx(0.6)
    assert metrics["letter_accuracy"] == pytest.approx(0.5)  # a tie goes to the first letter, here the answer
    assert metrics["letter_p_answer"] == pytest.approx(0.3)
    assert metrics["overconfidence"] == pytest.approx(0.1)
    assert metrics["probe_top_share"] == 1.0  # both prefer A (the tie, as the accuracy reads it)


def test_probe_top_share_is_the_share_of_the_most_common_preferred_letter():
    preferred = "ABBCBD"
    samples = [{"answer": "A", "letter_probs": {x: 0.7 if x == letter else 0.1 for x in "ABCD"}}
               for letter in preferred]
    assert letter_metrics(samples)["probe_top_share"] == pytest.approx(3 / 6)
    assert letter_metrics(samples[1:3])["probe_top_share"] == 1.0


class LetterTokenizer:
    """Stands in for a tokenizer: letters A-D are ids 10-13, the probe prefix is ids 5, 6, 7."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [10 + "ABCD".index(text)] if text in "ABCD" and len(text) == 1 else [5, 6, 7]
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def test_letter_probe_equals_an_unpadded_forward_pass():
    model = tiny_llama()
    prompts = [[3, 9, 4, 20, 21], [8, 30]]
    width = max(map(len, prompts))
    batch = PromptBatch(
        ids=torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
        mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
    )
    examples = [MCQExample("q", "A", "s", 0, "ABCD"), MCQExample("q", "B", "s", 1, "AB")]
    probs = answer_letter_probs(model, LetterTokenizer(), batch, examples, "prefix")
    for prompt, example, got in zip(prompts, examples, probs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + [5, 6, 7]])).logits[0, -1].double()
        expected = logits[[10 + "ABCD".index(letter) for letter in example.letters]].softmax(-1)
        assert list(got) == list(example.letters)
        torch.testing.assert_close(torch.tensor(list(got.values()), dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)


def test_a_letter_of_several_tokens_is_refused():
    class Splitting:
        def __call__(self, text, add_special_tokens=False):
            return SimpleNamespace(input_ids=[1, 2])

    with pytest.raises(ValueError, match="'A' is 2 tokens"):
        single_token_id(Splitting(), "A")


def test_changes_from_the_untrained_model():
    baseline = {"eval/u/letter_entropy": 1.3, "eval/u/acc_avg@2": 0.2, "eval/u/entropy": 2.0}
    now = {"eval/u/letter_entropy": 1.0, "eval/u/acc_avg@2": 0.5, "eval/u/entropy": 2.5, "eval/v/entropy": 1.0}
    changes = changes_from(baseline, now)
    assert changes == pytest.approx({"eval/u/letter_entropy_change": -0.3, "eval/u/entropy_change": 0.5})


def test_each_dataset_says_what_it_evaluates_and_how_long_it_took(tmp_path, caplog):
    import logging

    from demopsd.data.synthetic import generate_synthetic
    from demopsd.evaluation.runner import run_all
    from tests.fixed_step import default_tokenizer
    from tests.helpers import tiny_policy

    tokenizer = default_tokenizer()
    datasets = {"synthetic-inferable": generate_synthetic("inferable", "test", size=3),
                "synthetic-uninferable": generate_synthetic("uninferable", "test", size=3)}
    config = EvalConfig(k=2, max_new_tokens=2, greedy=False, probe=False, max_examples=2)
    with caplog.at_level(logging.INFO, logger="demopsd.evaluation.evaluate"):
        metrics = run_all(tiny_policy(tokenizer), tokenizer, datasets, config, tmp_path, seed=0, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    for name in datasets:
        assert f"Evaluating {name}: 2 questions × 2 sampled answers" in messages
        assert any(m.startswith(f"Evaluated {name} in ") and m.endswith(" s") for m in messages)
        assert metrics[f"eval/{name}/num_questions"] == 2


def test_questions_probed_beyond_those_answered_change_no_answer(tmp_path, caplog):
    """Seven questions probed and three answered, in batches of two: the answers are those of an evaluation that
    probes only the three, the probabilities those of one that answers all seven."""
    import dataclasses
    import logging

    from demopsd.data.synthetic import generate_synthetic
    from demopsd.evaluation.runner import run_all
    from tests.fixed_step import default_tokenizer
    from tests.helpers import tiny_policy

    tokenizer = default_tokenizer()
    policy = tiny_policy(tokenizer)
    datasets = {"u": generate_synthetic("uninferable", "test", size=9)}
    answer_three = EvalConfig(k=2, max_new_tokens=3, batch_size=2, max_examples=3)
    configs = {"probe three": answer_three, "probe seven": dataclasses.replace(answer_three, probe_examples=7),
               "answer seven": dataclasses.replace(answer_three, max_examples=7)}
    metrics, records = {}, {}
    for name, config in configs.items():
        with caplog.at_level(logging.INFO, logger="demopsd.evaluation.evaluate"):
            metrics[name] = run_all(policy, tokenizer, datasets, config, tmp_path / name, seed=0, progress=False)
        lines = (tmp_path / name / "samples.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines]
    assert "Evaluating u: 3 questions × 2 sampled answers, plus a greedy one; the letter probe on 7" in caplog.messages

    probed = records["probe seven"]
    assert [r["idx"] for r in probed] == [e.idx for e in datasets["u"][:7]]
    def answers(records):
        return [(r["samples"], r["greedy"]) for r in records if "samples" in r]

    assert answers(probed) == answers(records["probe three"]) and len(answers(probed)) == 3
    assert [set(r) for r in probed[3:]] == [{"dataset", "idx", "answer", "letter_probs"}] * 4
    assert [r["letter_probs"] for r in probed] == [r["letter_probs"] for r in records["answer seven"]]
    for key, value in metrics["probe seven"].items():
        name = key.rsplit("/", 1)[1]
        if name == "num_probed":
            assert value == 7 and metrics["probe three"][key] == 3
        elif name in ("letter_entropy", "letter_confidence", "letter_accuracy", "letter_p_answer", "overconfidence",
                      "probe_top_share"):
            assert value == metrics["answer seven"][key]
        else:
            assert value == metrics["probe three"][key], key
    assert metrics["probe seven"]["eval/u/num_questions"] == 3


def test_each_batch_has_its_own_seed_of_the_evaluation_seed_the_dataset_and_the_batch():
    from demopsd.evaluation.evaluate import batch_seed

    seeds = [batch_seed(seed, name, i) for seed in (0, 1, 2) for name in ("a", "b") for i in range(3)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(1, "a", 2) == batch_seed(1, "a", 2)  # a hash, the same in every process and every run


@pytest.mark.parametrize("cuda, choice, expected", [(False, "auto", "cpu"), (True, "auto", "cuda"),
                                                    (True, "cpu", "cpu"), (True, "cuda", "cuda")])
def test_eval_runs_on_cuda_where_torch_has_it(monkeypatch, cuda, choice, expected):
    from demopsd.evaluation.runner import eval_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert eval_device(choice) == torch.device(expected)


@pytest.mark.parametrize("choice, message", [("cuda", r"device=cuda, but torch finds no CUDA device.*device=cpu"),
                                             ("gpu", r"device='gpu': one of \('auto', 'cpu', 'cuda'\)")])
def test_a_device_that_cannot_be_had_is_an_error_naming_the_key(monkeypatch, tmp_path, choice, message):
    from hydra import compose, initialize_config_dir

    from demopsd.config.check import ConfigError, validate_eval_config
    from demopsd.evaluation.runner import run_evaluation
    from tests.helpers import CONFIG_DIR

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"device={choice}", f"paths.output_dir={tmp_path / 'out'}"])
    with pytest.raises((ValueError, ConfigError), match=message):
        run_evaluation(validate_eval_config(cfg))
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written
