"""Multiple-choice datasets: SciKnowEval L3 splits, and the dispatch to GPQA and the synthetic task.

The SciKnowEval splits are JSON Lines files at ``<data_dir>/sciknoweval/<domain>/{train,test}.json`` (the
layout of ``../shared/data``; see its README). They are read from the given directory, never copied
into the project. Where they are missing and the Hugging Face hub is reachable, they are built from
``hicai-zju/SciKnowEval`` exactly as the SDPO reference release built them and written there.
:func:`load_split` reads any ``data=`` config: ``source`` picks SciKnowEval, GPQA (:mod:`demopsd.gpqa`)
or the generated task (:mod:`demopsd.synthetic`).

Every row read from a file is checked (:func:`load_sciknoweval`, :func:`demopsd.gpqa.load_gpqa`). A bad row is
an error naming ``<path>:<line>`` under ``data.on_bad_row=error`` (the default); under ``skip`` it is left out,
a warning lists why, and the loaded split's ``skipped`` attribute counts it (see :class:`LoadedSplit`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("biology", "chemistry", "material", "physics")
SPLITS = ("train", "test")
HUB_DATASET = "hicai-zju/SciKnowEval"
MCQ_TYPES = ("mcq-4-choices", "mcq-2-choices")
SYSTEM_PROMPT = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>
"""
_OPTION_LINE = re.compile(r"^([A-Z]): ", re.MULTILINE)
ON_BAD_ROW = ("error", "skip")
"""Accepted values of ``data.on_bad_row``: stop at the first bad row, or skip (and count) bad rows."""
REQUIRED_FIELDS = {"prompt": str, "answer": str, "system": str, "idx": int}
"""The fields every SciKnowEval row must have, with their JSON types."""
_REASONS_SHOWN = 5  # bad rows listed in the warning of a skip, the rest only counted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MCQExample:
    """One multiple-choice question."""

    prompt: str
    """Question, ``A: ...`` option lines, then "Please reason step by step."."""
    answer: str
    """The correct option letter."""
    system: str
    idx: int
    letters: str
    """The option letters present in the prompt, e.g. ``"ABCD"`` or ``"AB"``."""
    reward_rule: str = "answer_tag"
    """How a completion is scored (``data.reward``; see :mod:`demopsd.rewards`)."""


class LoadedSplit(list):
    """The examples of a split (a plain ``list`` of :class:`MCQExample` in every other respect), and ``skipped``:
    how many bad rows of its file were left out under ``data.on_bad_row=skip`` (0 under ``error``)."""

    def __init__(self, examples: Iterable[MCQExample] = (), skipped: int = 0) -> None:
        super().__init__(examples)
        self.skipped = skipped


class BadRowError(ValueError):
    """A bad data row under ``data.on_bad_row=error``: ``<where>: <reason> (set data.on_bad_row=skip ...)``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason} (set data.on_bad_row=skip to skip such rows)")
        self.where, self.reason = where, reason


class RowChecker:
    """The bad rows of one source: :meth:`bad` raises :class:`BadRowError` under ``error``, records under ``skip``.

    ``unit`` names the position of a row: ``"line"`` (a 1-based line of the file ``source``: the error says
    ``<source>:<n>``) or ``"row"`` (a 0-based row of a non-file source: ``<source> row <n>``).
    """

    def __init__(self, source: str, on_bad_row: str, unit: str = "line") -> None:
        self.source, self.on_bad_row, self.unit = source, check_on_bad_row(on_bad_row), unit
        self.problems: list[tuple[int, str]] = []

    def bad(self, position: int, reason: str) -> None:
        if self.on_bad_row == "error":
            where = f"{self.source}:{position}" if self.unit == "line" else f"{self.source} row {position}"
            raise BadRowError(where, reason)
        self.problems.append((position, reason))

    def finish(self, examples: Iterable[MCQExample], total: int) -> LoadedSplit:
        """``examples`` as a :class:`LoadedSplit`; warns what was skipped of the ``total`` rows read."""
        loaded = LoadedSplit(examples, skipped=len(self.problems))
        if not self.problems:
            return loaded
        shown = "; ".join(f"{self.unit} {position}: {reason}" for position, reason in self.problems[:_REASONS_SHOWN])
        more = len(self.problems) - _REASONS_SHOWN
        summary = f"{len(self.problems)} of {total} rows of {self.source}: {shown}"
        summary += f"; ... {more} more" if more > 0 else ""
        if len(self.problems) == total:
            raise ValueError(f"every row is bad (data.on_bad_row=skip leaves none): {summary}")
        log.warning("skipped %s", summary)
        return loaded


def check_on_bad_row(on_bad_row: str) -> str:
    """``on_bad_row`` if it is one of :data:`ON_BAD_ROW`, else a ValueError naming the value."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"data.on_bad_row={on_bad_row!r} is invalid: one of {ON_BAD_ROW} is accepted")
    return on_bad_row


def student_conversation(example: MCQExample) -> list[dict[str, str]]:
    """The chat the policy answers: the task's system prompt, then the question."""
    return [{"role": "system", "content": example.system}, {"role": "user", "content": example.prompt}]


def option_letters(prompt: str) -> str:
    """The option letters of ``prompt``, from its ``X: ...`` lines; they must run A, B, C, ..."""
    letters = "".join(_OPTION_LINE.findall(prompt))
    if not letters or letters != string.ascii_uppercase[: len(letters)]:
        raise ValueError(f"prompt has option lines {letters!r}, expected consecutive letters from 'A': {prompt!r}")
    return letters


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$DEMOPSD_DATA_DIR``, else ``./data``."""
    return Path(data_dir or os.environ.get("DEMOPSD_DATA_DIR") or "data").expanduser()


SOURCES = ("sciknoweval", "gpqa", "synthetic")


REFERENCE_REWARDS = {"sciknoweval": "answer_tag", "synthetic": "answer_tag", "gpqa": "last_letter"}
"""The SDPO reference's reward rule of each source, used where ``data.reward`` is not set."""


def load_split(
    data: Mapping, split: str, data_dir: str | Path | None = None, *, on_bad_row: str | None = None
) -> LoadedSplit:
    """The ``split`` of the dataset a ``data=`` config describes (its ``source`` picks the loader), each example
    scored under ``data.reward`` (default: the reference's rule of that source, :data:`REFERENCE_REWARDS`).

    Bad rows are handled as ``on_bad_row`` says, else as ``data.on_bad_row`` says, else they are an error;
    the result's ``skipped`` counts those left out (always 0 for the generated task).
    """
    from demopsd.rewards import REWARD_RULES

    rule = data.get("reward") or REFERENCE_REWARDS.get(data["source"], "answer_tag")
    if rule not in REWARD_RULES:
        raise ValueError(f"data.reward={rule!r} is invalid: one of {REWARD_RULES} is accepted")
    loaded = _load_examples(data, split, data_dir, on_bad_row=on_bad_row)
    return LoadedSplit((dataclasses.replace(e, reward_rule=rule) for e in loaded), loaded.skipped)


def _load_examples(
    data: Mapping, split: str, data_dir: str | Path | None = None, *, on_bad_row: str | None = None
) -> LoadedSplit:
    on_bad_row = check_on_bad_row(on_bad_row or data.get("on_bad_row") or "error")
    source = data["source"]
    if source == "sciknoweval":
        return load_sciknoweval(data_dir, data["domain"], split, on_bad_row=on_bad_row)
    if source == "gpqa":
        from demopsd.gpqa import load_gpqa

        if split != "test":
            raise ValueError(f"GPQA has only a test split; split={split!r} is not accepted (use it for evaluation)")
        return load_gpqa(
            data_dir, data["subset"], seed=data["shuffle_seed"], domains=data["domains"], on_bad_row=on_bad_row
        )
    if source == "synthetic":
        from demopsd.synthetic import generate_synthetic

        size = {"train": data.get("train_size"), "test": data.get("test_size")}.get(split)
        return LoadedSplit(generate_synthetic(data["kind"], split, seed=data.get("generator_seed", 0), size=size))
    raise ValueError(f"data.source={source!r} is invalid: one of {SOURCES} is accepted")


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
    letters = "".join(_OPTION_LINE.findall(prompt))
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
