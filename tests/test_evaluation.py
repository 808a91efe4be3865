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
from demopsd.evaluation.runner import changes_from
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
     ({"temperature": 0.0}, "eval.temperature=0.0"), ({"top_p": 1.5}, "eval.top_p=1.5")],
)
def test_bad_settings_name_the_value(kwargs, message):
    with pytest.raises(SettingError, match=message):
        EvalConfig(**kwargs)


def test_every_broken_setting_is_reported_at_once_under_the_eval_keys():
    with pytest.raises(SettingError) as caught:
        EvalConfig(k=0, top_p=2.0, batch_size=0, chunk_size=0)
    assert caught.value.section == "eval"
    assert [name for name, _, _ in caught.value.problems] == ["k", "top_p", "batch_size", "chunk_size"]


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
