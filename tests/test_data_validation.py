"""Bad data rows: an error naming ``<file>:<line>`` by default, or skipped and counted under ``on_bad_row=skip``."""

import json
import logging
import pickle
import re
from dataclasses import replace
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from demopsd.config.check import validate_config
from demopsd.config.sections import DATA_SOURCES, SciKnowEvalData, SyntheticData
from demopsd.data.datamodule import SKIPPED_ROWS_METRIC, PromptDataModule
from demopsd.data.gpqa import load_gpqa
from demopsd.data.loading import load_split
from demopsd.data.sciknoweval import load_sciknoweval
from demopsd.data.types import SYSTEM_PROMPT, BadRowError, LoadedSplit, MCQExample
from tests.helpers import data_dir
from tests.test_gpqa import HEADER, write_csv

DATA_DIR = data_dir()
DOMAINS = ("biology", "chemistry", "material", "physics")
HINT = "(set data.on_bad_row=skip to skip such rows)"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------- SciKnowEval
def good_row(idx: int, letters: str = "ABCD", answer: str = "A") -> dict:
    options = "\n".join(f"{letter}: option {letter.lower()}{idx}" for letter in letters)
    prompt = f"Question {idx}?\n\n{options}\nPlease reason step by step."
    return {"idx": idx, "kind": "mcq", "answer": answer, "prompt": prompt, "system": SYSTEM_PROMPT}


def write_split(root: Path, lines: list, domain: str = "biology", split: str = "train") -> Path:
    """Write ``lines`` (dicts as JSON, strings as they are) as ``<root>/sciknoweval/<domain>/<split>.json``."""
    path = root / "sciknoweval" / domain / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((json.dumps(line) if isinstance(line, dict) else line) + "\n" for line in lines))
    return path


def without(row: dict, key: str) -> dict:
    return {k: v for k, v in row.items() if k != key}


# (bad line, reason pattern); the bad line goes to line 3 of a file whose lines 1, 2 and 4 are good.
BAD_LINES = {
    "malformed JSON": ('{"idx": 2, "prompt": "Q?\\nA: x', r"invalid JSON \("),
    "not an object": ("[1, 2, 3]", r"not a JSON object \(a JSON list\)"),
    "missing prompt": (without(good_row(2), "prompt"), r"missing field 'prompt'"),
    "missing fields": (without(without(good_row(2), "answer"), "idx"), r"missing fields 'answer', 'idx'"),
    "missing system": (without(good_row(2), "system"), r"missing field 'system'"),
    "idx a string": (good_row(2) | {"idx": "2"}, r"field 'idx' is a string '2', expected an integer"),
    "idx a boolean": (good_row(2) | {"idx": True}, r"field 'idx' is a boolean True, expected an integer"),
    "prompt null": (good_row(2) | {"prompt": None}, r"field 'prompt' is null None, expected a string"),
    "answer a number": (good_row(2) | {"answer": 1}, r"field 'answer' is a number 1, expected a string"),
    "empty prompt": (good_row(2) | {"prompt": " \n\t"}, r"empty prompt"),
    "no options": (good_row(2) | {"prompt": "Q? Please reason step by step."}, r"prompt has no option lines"),
    "letters not consecutive": (
        good_row(2) | {"prompt": "Q?\n\nA: x\nB: y\nD: z\nPlease reason step by step."},
        r"prompt has option lines 'ABD', expected consecutive letters from 'A'",
    ),
    "letters not from A": (good_row(2, "BC", "B"), r"prompt has option lines 'BC', expected consecutive letters"),
    "answer not an option": (good_row(2, "AB", "C"), r"answer 'C' is not one of the option letters 'AB'"),
    "answer two letters": (good_row(2, "ABCD", "AB"), r"answer 'AB' is not one of the option letters 'ABCD'"),
    "answer lowercase": (good_row(2, "ABCD", "a"), r"answer 'a' is not one of the option letters"),
    "duplicate idx": (good_row(0), r"duplicate idx 0 \(first on line 1\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_is_an_error_naming_file_line_and_reason(tmp_path, case):
    line, reason = BAD_LINES[case]
    path = write_split(tmp_path, [good_row(0), good_row(1), line, good_row(3)])
    with pytest.raises(BadRowError) as err:
        load_sciknoweval(tmp_path, "biology", "train")
    message = str(err.value)
    assert message.startswith(f"{path}:3: ")
    assert message.endswith(HINT)
    assert re.search(reason, message), message
    assert (err.value.where, isinstance(err.value, ValueError)) == (f"{path}:3", True)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_skip_keeps_the_good_rows_counts_and_warns(tmp_path, case, caplog):
    line, reason = BAD_LINES[case]
    path = write_split(tmp_path, [good_row(0), good_row(1), line, good_row(3)])
    with caplog.at_level(logging.WARNING, logger="demopsd.data.types"):
        examples = load_sciknoweval(tmp_path, "biology", "train", on_bad_row="skip")
    assert [e.idx for e in examples] == [0, 1, 3]
    assert isinstance(examples, LoadedSplit) and examples.skipped == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.getMessage().startswith(f"skipped 1 of 4 rows of {path}: line 3: ")
    assert re.search(reason, record.getMessage())


def test_line_numbers_count_blank_lines(tmp_path):
    path = write_split(tmp_path, [good_row(0), "", "   ", good_row(1, "AB", "Z")])
    with pytest.raises(BadRowError, match=f"^{path}:4: answer 'Z'"):
        load_sciknoweval(tmp_path, "biology", "train")
    examples = load_sciknoweval(tmp_path, "biology", "train", on_bad_row="skip")
    assert [e.idx for e in examples] == [0] and examples.skipped == 1  # blank lines are no rows, not skipped rows


def test_error_mode_stops_at_the_first_bad_line(tmp_path):
    path = write_split(tmp_path, [good_row(0), "{", good_row(0)])
    with pytest.raises(BadRowError, match=f"^{path}:2: invalid JSON"):
        load_sciknoweval(tmp_path, "biology", "train")


def test_skip_summary_lists_the_first_reasons_and_counts_the_rest(tmp_path, caplog):
    lines = [good_row(0)] + ["not json"] * 3 + [good_row(1, "AB", "D"), good_row(0), good_row(2, "AB", "A"),
                                                  without(good_row(3), "system")]
    path = write_split(tmp_path, lines)
    with caplog.at_level(logging.WARNING, logger="demopsd.data.types"):
        examples = load_sciknoweval(tmp_path, "biology", "train", on_bad_row="skip")
    assert [e.idx for e in examples] == [0, 2] and examples.skipped == 6
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert message.startswith(f"skipped 6 of 8 rows of {path}: line 2: invalid JSON")
    for part in ("line 3: invalid JSON", "line 4: invalid JSON",
                 "line 5: answer 'D' is not one of the option letters 'AB'",
                 "line 6: duplicate idx 0 (first on line 1)", "... 1 more"):
        assert part in message
    assert "line 8" not in message


def test_duplicate_of_a_skipped_row_is_kept(tmp_path):
    """Only good rows claim their idx: a bad row with idx 1 does not make a later good idx 1 a duplicate."""
    write_split(tmp_path, [good_row(0), good_row(1, "AB", "C"), good_row(1)])
    examples = load_sciknoweval(tmp_path, "biology", "train", on_bad_row="skip")
    assert [e.idx for e in examples] == [0, 1] and examples.skipped == 1


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_split(tmp_path, ["{}", "[]"])
    with pytest.raises(ValueError, match=f"every row is bad .*2 of 2 rows of {path}: line 1: missing fields"):
        load_sciknoweval(tmp_path, "biology", "train", on_bad_row="skip")


def test_clean_file_loads_identically_in_both_modes(tmp_path, caplog):
    write_split(tmp_path, [good_row(0), good_row(1, "AB", "B"), good_row(7, "ABC", "C")])
    with caplog.at_level(logging.WARNING):
        strict = load_sciknoweval(tmp_path, "biology", "train")
        lenient = load_sciknoweval(tmp_path, "biology", "train", on_bad_row="skip")
    assert strict == lenient and strict.skipped == lenient.skipped == 0
    assert [(e.idx, e.letters, e.answer) for e in strict] == [(0, "ABCD", "A"), (1, "AB", "B"), (7, "ABC", "C")]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unknown_on_bad_row_is_named(tmp_path):
    write_split(tmp_path, [good_row(0)])
    with pytest.raises(ValueError, match=r"data.on_bad_row='ignore' is invalid: one of \('error', 'skip'\)"):
        load_sciknoweval(tmp_path, "biology", "train", on_bad_row="ignore")
    with pytest.raises(ValueError, match=r"data.on_bad_row='warn' is invalid"):
        SciKnowEvalData(on_bad_row="warn")


def test_load_split_reads_on_bad_row_from_the_config(tmp_path):
    path = write_split(tmp_path, [good_row(0), good_row(1, "AB", "C")])
    data = SciKnowEvalData()
    with pytest.raises(BadRowError, match=f"^{path}:2: "):
        load_split(data, "train", tmp_path)  # the default: error
    assert load_split(replace(data, on_bad_row="skip"), "train", tmp_path).skipped == 1
    assert load_split(data, "train", tmp_path, on_bad_row="skip").skipped == 1


def test_loaded_split_behaves_as_a_list(tmp_path):
    write_split(tmp_path, [good_row(i) for i in range(6)] + ["oops"])
    examples = load_sciknoweval(tmp_path, "biology", "train", on_bad_row="skip")
    assert isinstance(examples, list) and len(examples) == 6 and examples.skipped == 1
    assert examples[1:3] == [examples[1], examples[2]] and all(isinstance(e, MCQExample) for e in examples)
    again = pickle.loads(pickle.dumps(examples))  # DataLoader workers may pickle it
    assert again == examples and again.skipped == 1
    batches = list(DataLoader(examples, batch_size=4, collate_fn=list))
    assert [len(b) for b in batches] == [4, 2]


def test_synthetic_split_has_no_skipped_rows():
    data = SyntheticData(kind="uninferable", train_size=5)
    examples = load_split(data, "train")
    assert len(examples) == 5 and examples.skipped == 0


def test_every_data_source_defaults_to_error():
    assert {cls().on_bad_row for cls in DATA_SOURCES.values()} == {"error"}


# ------------------------------------------------------------------------------------------- the data directory
@pytest.mark.parametrize("domain", DOMAINS)
def test_the_data_directory_has_no_bad_rows(domain, caplog):
    data = SciKnowEvalData(domain=domain, on_bad_row="error")
    with caplog.at_level(logging.WARNING, logger="demopsd.data.types"):
        for split in ("train", "test"):
            strict = load_split(data, split, DATA_DIR)
            assert strict.skipped == 0 and len(strict) > 0
            assert load_split(replace(data, on_bad_row="skip"), split, DATA_DIR) == strict
    assert not caplog.records


# ------------------------------------------------------------------------------------------- GPQA
def gpqa_row(i: int, domain: str = "Physics") -> dict:
    return {"Question": f"What is {i}?", "Correct Answer": f"right {i}", "Incorrect Answer 1": f"wrong {i}.1",
            "Incorrect Answer 2": f"wrong {i}.2", "Incorrect Answer 3": f"wrong {i}.3", "Explanation": "because",
            "High-level domain": domain, "Subdomain": "sub"}


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("Question", "  ", "empty or missing Question"),
        ("Correct Answer", "", "empty or missing Correct Answer"),
        ("Incorrect Answer 2", "\n", "empty or missing Incorrect Answer 2"),
    ],
)
def test_gpqa_bad_row_names_file_and_line(tmp_path, column, value, reason, caplog):
    rows = [gpqa_row(i) for i in range(4)]
    rows[2][column] = value
    path = write_csv(tmp_path, rows)
    with pytest.raises(BadRowError) as err:
        load_gpqa(tmp_path)
    assert str(err.value) == f"{path}:4: {reason} {HINT}"  # header line 1, rows 0, 1 on lines 2, 3
    with caplog.at_level(logging.WARNING, logger="demopsd.data.types"):
        examples = load_gpqa(tmp_path, on_bad_row="skip")
    assert [e.idx for e in examples] == [0, 1, 3] and examples.skipped == 1  # CSV row indices are kept
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert message == f"skipped 1 of 4 rows of {path}: line 4: {reason}"


def test_gpqa_line_numbers_follow_multiline_quoted_fields(tmp_path):
    rows = [gpqa_row(0) | {"Question": "Line one,\nline two,\nline three?"}, gpqa_row(1) | {"Explanation": "a\nb"},
            gpqa_row(2) | {"Correct Answer": ""}]
    path = write_csv(tmp_path, rows)
    # header: line 1; row 0: lines 2-4; row 1: lines 5-6; row 2 starts on line 7
    with pytest.raises(BadRowError, match=f"^{path}:7: empty or missing Correct Answer"):
        load_gpqa(tmp_path)
    assert path.read_text().split("\n")[6].startswith(",What is 2?")  # after the empty Pre-Revision Question


def test_gpqa_short_row_misses_its_last_columns(tmp_path):
    path = write_csv(tmp_path, [gpqa_row(0), gpqa_row(1)])
    with path.open("a", encoding="utf-8") as f:
        f.write("q,a,b,c,d,expl\n")  # no High-level domain
        f.write("q,a,b\n")  # no Incorrect Answer 2, 3
    with pytest.raises(BadRowError, match=f"^{path}:4: no 'High-level domain' value"):
        load_gpqa(tmp_path)
    examples = load_gpqa(tmp_path, on_bad_row="skip")
    assert [e.idx for e in examples] == [0, 1] and examples.skipped == 2


def test_gpqa_missing_column_is_an_error_in_both_modes(tmp_path):
    header = [c for c in HEADER if c != "Incorrect Answer 3"]
    path = write_csv(tmp_path, [{k: v for k, v in gpqa_row(0).items() if k in header}], header=header)
    for mode in ("error", "skip"):
        with pytest.raises(ValueError, match=rf"^{path}:1: missing GPQA columns \['Incorrect Answer 3'\]"):
            load_gpqa(tmp_path, on_bad_row=mode)


def test_gpqa_clean_file_loads_identically_in_both_modes(tmp_path):
    write_csv(tmp_path, [gpqa_row(i, d) for i, d in enumerate(["Physics", "Biology", "Physics"])])
    strict, lenient = load_gpqa(tmp_path, seed=3), load_gpqa(tmp_path, seed=3, on_bad_row="skip")
    assert strict == lenient and len(strict) == 3 and strict.skipped == lenient.skipped == 0
    assert load_gpqa(tmp_path, seed=3, domains="Biology", on_bad_row="skip") == [strict[1]]


def test_gpqa_skip_then_domain_filter(tmp_path):
    rows = [gpqa_row(0, "Physics"), gpqa_row(1, "Biology") | {"Question": ""}, gpqa_row(2, "Biology")]
    write_csv(tmp_path, rows)
    examples = load_gpqa(tmp_path, domains="Biology", on_bad_row="skip")
    assert [e.idx for e in examples] == [2] and examples.skipped == 1


def test_gpqa_hub_rows_are_named_by_index(tmp_path, monkeypatch):
    import datasets

    rows = [gpqa_row(0), gpqa_row(1) | {"Incorrect Answer 1": None}, gpqa_row(2)]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: rows)
    where = r"^Idavidrein/gpqa \(config gpqa_diamond\) row 1: "
    with pytest.raises(BadRowError, match=where + "empty or missing Incorrect Answer 1"):
        load_gpqa(tmp_path)
    examples = load_gpqa(tmp_path, on_bad_row="skip")
    assert [e.idx for e in examples] == [0, 2] and examples.skipped == 1


def test_gpqa_through_load_split_and_the_composed_config(tmp_path):
    from hydra import compose, initialize_config_dir

    rows = [gpqa_row(0), gpqa_row(1) | {"Question": ""}]
    write_csv(tmp_path, rows)
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        data = validate_config(compose("train", overrides=["data=gpqa/diamond"])).data
    assert data.on_bad_row == "error"
    with pytest.raises(BadRowError):
        load_split(data, "test", tmp_path)
    assert load_split(replace(data, on_bad_row="skip"), "test", tmp_path).skipped == 1


# ------------------------------------------------------------------------------------------- datamodule
class FakeLogger:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((metrics, step))


class FakeTrainer:
    def __init__(self):
        self.loggers = [FakeLogger(), FakeLogger()]
        self.global_step, self.global_rank, self.world_size = 0, 0, 1


def biology(**changes) -> SciKnowEvalData:
    return SciKnowEvalData(name="toy-biology", batch_size=2, **changes)


def test_datamodule_counts_prints_and_logs_skipped_rows_once(tmp_path, capsys):
    write_split(tmp_path, [good_row(i) for i in range(5)] + ["{", good_row(0)])
    dm = PromptDataModule(biology(on_bad_row="skip"), data_dir=tmp_path)
    trainer = FakeTrainer()
    dm.trainer = trainer
    dm.setup("fit")
    dm.setup("fit")
    assert len(dm.train_examples) == 5 and dm.skipped_rows == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "skipped 2 bad rows of toy-biology/train" in out
    assert sum(len(batch) for batch in dm.train_dataloader()) == 4
    dm.train_dataloader()
    for logger in trainer.loggers:
        assert logger.logged == [({SKIPPED_ROWS_METRIC: 2.0}, 0)]


def test_a_resumed_datamodule_does_not_log_skipped_rows_again(tmp_path):
    write_split(tmp_path, [good_row(i) for i in range(5)] + ["{"])
    first = PromptDataModule(biology(on_bad_row="skip"), data_dir=tmp_path)
    first.trainer = FakeTrainer()
    first.setup("fit")
    first.train_dataloader()
    resumed = PromptDataModule(biology(on_bad_row="skip"), data_dir=tmp_path)
    resumed.trainer = FakeTrainer()
    resumed.setup("fit")
    resumed.load_state_dict(first.state_dict())
    resumed.train_dataloader()
    assert first.trainer.loggers[0].logged and resumed.trainer.loggers[0].logged == []


def test_datamodule_clean_data_logs_zero_and_prints_nothing(tmp_path, capsys):
    write_split(tmp_path, [good_row(i) for i in range(4)])
    dm = PromptDataModule(biology(), data_dir=tmp_path)
    dm.setup("fit")
    dm.train_dataloader()  # no trainer: nothing to log to
    dm.trainer = FakeTrainer()
    dm.train_dataloader()
    assert dm.skipped_rows == 0 and capsys.readouterr().out == ""
    assert dm.trainer.loggers[0].logged == [({SKIPPED_ROWS_METRIC: 0.0}, 0)]


def test_datamodule_error_mode_names_file_and_line(tmp_path):
    path = write_split(tmp_path, [good_row(0), good_row(1), good_row(2, "AB", "C")])
    dm = PromptDataModule(biology(), data_dir=tmp_path)
    with pytest.raises(BadRowError, match=f"^{path}:3: answer 'C'"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------- evaluation
def test_eval_datasets_pass_data_on_bad_row_to_the_ood_sets(tmp_path):
    from hydra import compose, initialize_config_dir

    from demopsd.evaluation.runner import eval_datasets

    write_split(tmp_path, [good_row(0), good_row(1, "AB", "C"), good_row(2)], split="test")
    write_csv(tmp_path, [gpqa_row(0), gpqa_row(1) | {"Question": ""}, gpqa_row(2)])
    overrides = ["data=sciknoweval/biology", "eval=gpqa", f"paths.data_dir={tmp_path}"]
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        strict = validate_config(compose("train", overrides=overrides))
        lenient = validate_config(compose("train", overrides=[*overrides, "data.on_bad_row=skip"]))
        ood_only = validate_config(compose("train", overrides=[*overrides, "eval.ood.gpqa_diamond.on_bad_row=skip",
                                                               "eval.in_domain=false"]))

    def datasets_of(settings):
        return eval_datasets(settings.data, settings.eval, settings.paths.data_dir)

    with pytest.raises(BadRowError, match="biology/test.json:2: "):
        datasets_of(strict)
    datasets = datasets_of(lenient)
    assert {name: (len(d), d.skipped) for name, d in datasets.items()} == {
        "sciknoweval-biology": (2, 1), "gpqa-diamond": (2, 1)}
    assert datasets_of(ood_only)["gpqa-diamond"].skipped == 1
