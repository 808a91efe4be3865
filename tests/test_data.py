"""Tests for the SciKnowEval loader, on the shared data directory."""

import os
from pathlib import Path

import pytest

from demopsd.data import SYSTEM_PROMPT, MCQExample, load_sciknoweval, option_letters

DATA_DIR = Path(os.environ.get("DEMOPSD_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
ROWS = {"biology": (450, 50), "chemistry": (1890, 210), "material": (841, 94), "physics": (720, 80)}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("domain", sorted(ROWS))
def test_row_counts_and_answers(domain):
    train, test = (load_sciknoweval(DATA_DIR, domain, split) for split in ("train", "test"))
    assert (len(train), len(test)) == ROWS[domain]
    examples = train + test
    assert sorted(e.idx for e in examples) == list(range(len(examples)))
    for e in examples:
        assert e.letters in ("AB", "ABCD") and e.answer in e.letters
        assert e.prompt.endswith("Please reason step by step.")
        assert e.system == SYSTEM_PROMPT  # the prompt the hub build writes


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
