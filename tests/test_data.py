"""Tests for the SciKnowEval loader: on the repository's fixtures, and on the real splits where a data directory
with them is named (``DEMOPSD_DATA_DIR``)."""

import pytest

from demopsd.data.sciknoweval import load_sciknoweval
from demopsd.data.types import SYSTEM_PROMPT, MCQExample, option_letters
from tests.helpers import FIXTURE_DATA_DIR, data_dir, real_data

DATA_DIR = data_dir()
REAL_ROWS = {"biology": (450, 50), "chemistry": (1890, 210), "material": (841, 94), "physics": (720, 80)}
FIXTURE_ROWS = {domain: (6, 3) for domain in REAL_ROWS}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def check_rows(directory, domain, rows):
    train, test = (load_sciknoweval(directory, domain, split) for split in ("train", "test"))
    assert (len(train), len(test)) == rows[domain]
    examples = train + test
    assert sorted(e.idx for e in examples) == list(range(len(examples)))
    for e in examples:
        assert e.letters in ("AB", "ABCD") and e.answer in e.letters
        assert e.prompt.endswith("Please reason step by step.")
        assert e.system == SYSTEM_PROMPT  # the prompt the hub build writes
    return train + test


@pytest.mark.skipif(not real_data(), reason="needs the real SciKnowEval splits: set DEMOPSD_DATA_DIR to their directory")
@pytest.mark.parametrize("domain", sorted(REAL_ROWS))
def test_real_row_counts_and_answers(domain):
    check_rows(DATA_DIR, domain, REAL_ROWS)


@pytest.mark.parametrize("domain", sorted(FIXTURE_ROWS))
def test_fixture_rows_load_like_the_real_ones(domain):
    examples = check_rows(FIXTURE_DATA_DIR, domain, FIXTURE_ROWS)
    assert {e.letters for e in examples} == {"AB", "ABCD"}  # both question types, as in the real splits


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv("DEMOPSD_DATA_DIR", str(DATA_DIR))
    first = load_sciknoweval(None, "biology", "test")[0]
    assert isinstance(first, MCQExample) and first == load_sciknoweval(DATA_DIR, "biology", "test")[0]


def test_missing_data_offline_names_the_directory_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_sciknoweval(tmp_path, "physics", "train")
    message = str(err.value)
    assert str(tmp_path) in message
    assert "paths.data_dir" in message and "DEMOPSD_DATA_DIR" in message
    assert "sciknoweval/<domain>/<split>.json" in message
    assert "Hugging Face access" in message and "built there automatically" in message
    assert not (tmp_path / "sciknoweval").exists()


@pytest.mark.parametrize(
    ("domain", "split", "message"),
    [
        ("geology", "train", "unknown SciKnowEval domain 'geology'; accepted: biology, chemistry, material, physics"),
        ("Biology", "train", "domain 'Biology'"),
        ("biology", "validation", "unknown SciKnowEval split 'validation'; accepted: train, test"),
    ],
)
def test_unknown_domain_or_split(tmp_path, domain, split, message):
    with pytest.raises(ValueError, match=message):
        load_sciknoweval(tmp_path, domain, split)


def test_option_letters():
    assert option_letters("Q?\n\nA: 1\nB: 2\nC: 3\nD: 4\nPlease reason step by step.") == "ABCD"
    assert option_letters("Which?\n\nA: x\nB: y\nPlease reason step by step.") == "AB"
    with pytest.raises(ValueError, match="expected consecutive letters"):
        option_letters("Q?\nA: 1\nC: 3")
    with pytest.raises(ValueError, match="expected consecutive letters"):
        option_letters("no options at all")
