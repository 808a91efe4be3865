"""SciKnowEval L3 splits: JSON Lines files at ``<data_dir>/sciknoweval/<domain>/{train,test}.json`` (the layout of
``../shared/data``; see its README). They are read from the given directory, never copied into the project.
Where they are missing and the Hugging Face hub is reachable, they are built from ``hicai-zju/SciKnowEval``
exactly as the SDPO reference release built them and written there.

Every row read is checked (:func:`load_sciknoweval`). A bad row is an error naming ``<path>:<line>`` under
``data.on_bad_row=error`` (the default); under ``skip`` it is left out, a warning lists why, and the loaded
split's ``skipped`` attribute counts it (see :class:`demopsd.data.types.LoadedSplit`)."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from demopsd.data.types import (
    OPTION_LINE,
    SYSTEM_PROMPT,
    LoadedSplit,
    MCQExample,
    RowChecker,
    resolve_data_dir,
)

DOMAINS = ("biology", "chemistry", "material", "physics")
SPLITS = ("train", "test")
HUB_DATASET = "hicai-zju/SciKnowEval"
MCQ_TYPES = ("mcq-4-choices", "mcq-2-choices")
REQUIRED_FIELDS = {"prompt": str, "answer": str, "system": str, "idx": int}
"""The fields every SciKnowEval row must have, with their JSON types."""


def load_sciknoweval(
    data_dir: str | Path | None, domain: str, split: str, *, on_bad_row: str = "error"
) -> LoadedSplit:
    """The ``split`` of ``domain``, read from ``data_dir`` (built from the hub if missing).

    Each non-blank line must be a JSON object with the :data:`REQUIRED_FIELDS`, a non-empty prompt whose
    option lines run A, B, ..., an answer among those letters, and an ``idx`` no earlier line has. A line
    that is not is a :class:`BadRowError` (``on_bad_row="error"``) or left out and counted (``"skip"``).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown SciKnowEval domain {domain!r}; accepted: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown SciKnowEval split {split!r}; accepted: {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    path = root / "sciknoweval" / domain / f"{split}.json"
    if not path.exists():
        _build_from_hub(root, domain, path)
    checker = RowChecker(str(path), on_bad_row)
    examples: list[MCQExample] = []
    first_line: dict[int, int] = {}  # idx -> the line that has it
    total = 0
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            total += 1
            example, reason = _parse_row(line)
            if example is not None and example.idx in first_line:
                example, reason = None, f"duplicate idx {example.idx} (first on line {first_line[example.idx]})"
            if example is None:
                checker.bad(number, reason)
                continue
            first_line[example.idx] = number
            examples.append(example)
    return checker.finish(examples, total)


def _parse_row(line: str) -> tuple[MCQExample | None, str]:
    """The example of one SciKnowEval line, or None and what is wrong with the line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at column {err.colno})"
    if not isinstance(row, dict):
        return None, f"not a JSON object (a JSON {type(row).__name__})"
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        return None, f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
    for name, kind in REQUIRED_FIELDS.items():
        value = row[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = "an integer" if kind is int else "a string"
            return None, f"field {name!r} is {_json_type(value)} {_short(value)}, expected {expected}"
    prompt, answer = row["prompt"], row["answer"]
    if not prompt.strip():
        return None, "empty prompt"
    letters = "".join(OPTION_LINE.findall(prompt))
    if not letters:
        return None, "prompt has no option lines ('A: ...')"
    if letters != string.ascii_uppercase[: len(letters)]:
        return None, f"prompt has option lines {letters!r}, expected consecutive letters from 'A'"
    if answer not in tuple(letters):
        return None, f"answer {_short(answer)} is not one of the option letters {letters!r}"
    return MCQExample(prompt, answer, row["system"], row["idx"], letters), ""


def _json_type(value) -> str:
    """The JSON name of ``value``'s type (``a string``, ``a number``, ``null`` ...)."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _short(value, limit: int = 40) -> str:
    """``repr(value)``, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build_from_hub(root: Path, domain: str, missing: Path) -> None:
    """Write both splits of ``domain`` under ``root`` from the hub, or explain how to supply them."""
    try:
        import datasets

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        rows = datasets.load_dataset(HUB_DATASET, split="test").filter(
            lambda r: r["domain"] == domain.capitalize()
            and r["details"]["level"] == "L3"
            and r["type"] in MCQ_TYPES
        )
        parts = rows.add_column("idx", list(range(len(rows)))).train_test_split(test_size=0.1, seed=42)
    except Exception as err:
        raise FileNotFoundError(
            f"SciKnowEval data not found: {missing} does not exist under the data directory {root}, and it could "
            f"not be built from the Hugging Face hub ({type(err).__name__}: {err}). Set paths.data_dir (or the "
            f"DEMOPSD_DATA_DIR environment variable) to a directory holding sciknoweval/<domain>/<split>.json; "
            f"with Hugging Face access the files are built there automatically."
        ) from err
    for split in SPLITS:
        out = root / "sciknoweval" / domain / f"{split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in parts[split]:
                f.write(json.dumps(_to_row(r)) + "\n")
        tmp.replace(out)


def _to_row(r: dict) -> dict:
    """A hub record (with its index in the filtered set as ``idx``) in the layout of the shared files."""
    options = "\n".join(f"{label}: {text}" for label, text in zip(r["choices"]["label"], r["choices"]["text"]))
    question = r["question"].strip()
    return {
        "idx": r["idx"],
        "kind": "mcq",
        "dataset": "sciknoweval",
        "answer": r["answerKey"],
        "elo": 1500,
        "prompt": f"{question}\n\n{options}\nPlease reason step by step.",
        "description": f"{question} The solution will be evaluated in a mcq environment.",
        "tests": "-",
        "embedding": [],
        "system": SYSTEM_PROMPT,
    }
