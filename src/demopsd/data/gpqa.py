"""GPQA multiple-choice questions, as evaluation prompts in one of two layouts (``prompt_style``).

- ``reference`` (the default): the SDPO reference's own GPQA prompt (its ``data/format/gpqa.py``), with no system
  prompt: an instruction to give the letter in ``\\boxed{}``, then ``Problem: <question>``, then
  ``Options: A) <text>, B) <text>, C) <text>, D) <text>`` on one line, then ``Answer:``. The question and
  option texts are used as the file has them, as the reference does. Score it with ``data.reward=last_letter``
  (the reference's rule for GPQA).
- ``sciknoweval``: the SciKnowEval layout (the task's system prompt, ``A: <text>`` option lines, "Please reason
  step by step."), with stripped texts, for comparing with the in-domain evaluation under the same instructions.

The official release is a set of CSV files (``gpqa_diamond.csv``, ``gpqa_main.csv``,
``gpqa_extended.csv``) read from ``<data_dir>/gpqa/``. Where the file is missing and the Hugging Face
hub is reachable, the gated dataset ``Idavidrein/gpqa`` (config ``gpqa_<subset>``) is read instead.

Each row holds the question, the correct answer text and three incorrect ones. The four texts are put
in an order fixed by ``(seed, question text)`` through SHA-256, so the letters are the same on every
run, machine and Python version, and the same question gets the same letters in every subset and both
layouts. (The reference shuffles with an unseeded ``random.shuffle`` each time it builds its file, so its letters
cannot be reproduced; a fixed order is the deliberate difference.)

A row with an empty or missing question or answer text, or no domain value, is an error naming
``<path>:<line>`` (the CSV line where the row starts; the header is line 1), or is skipped and counted
under ``on_bad_row="skip"`` (see :class:`demopsd.data.types.RowChecker`).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from demopsd.config.sections import GPQAData
from demopsd.data.types import SYSTEM_PROMPT, LoadedSplit, MCQExample, RowChecker, resolve_data_dir

SUBSETS, PROMPT_STYLES = GPQAData.SUBSETS, GPQAData.PROMPT_STYLES
REFERENCE_PROMPT = (
    "Return your final response within \\boxed{{}} and only include the letter choice (A, B, C, or D) as your "
    "final response.\nProblem: {question}\nOptions: {options}\nAnswer:"
)
"""The reference's GPQA prompt (``data/format/gpqa.py``), filled with the question and the one-line options."""
HUB_DATASET = "Idavidrein/gpqa"
LETTERS = "ABCD"
QUESTION, CORRECT, DOMAIN = "Question", "Correct Answer", "High-level domain"
INCORRECT = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
COLUMNS = (QUESTION, CORRECT, *INCORRECT, DOMAIN)
_ORDERS = tuple(itertools.permutations(range(len(LETTERS))))  # 24 orders, in lexicographic order


def gpqa_path(data_dir: str | Path | None, subset: str) -> Path:
    """Where the official CSV of ``subset`` is expected: ``<data_dir>/gpqa/gpqa_<subset>.csv``."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown GPQA subset {subset!r}; accepted: {', '.join(SUBSETS)}")
    return resolve_data_dir(data_dir) / "gpqa" / f"gpqa_{subset}.csv"


def option_order(seed: int, question: str) -> tuple[int, ...]:
    """The order of the four answer texts (index 0 is the correct one) for ``question`` under ``seed``.

    One of the 24 permutations, picked by the first 8 bytes of SHA-256 of ``"<seed>\\0<question>"``.
    """
    digest = hashlib.sha256(f"{seed}\0{question}".encode()).digest()
    return _ORDERS[int.from_bytes(digest[:8], "big") % len(_ORDERS)]


def to_example(row: dict, idx: int, seed: int, prompt_style: str = "reference") -> MCQExample:
    """The prompt of one GPQA row (already checked by ``_row_problem``) in ``prompt_style``, options shuffled."""
    order = option_order(seed, row[QUESTION].strip())
    answer = LETTERS[order.index(0)]
    columns = (CORRECT, *INCORRECT)
    if prompt_style == "reference":
        options = ", ".join(f"{letter}) {row[columns[i]]}" for letter, i in zip(LETTERS, order))
        return MCQExample(REFERENCE_PROMPT.format(question=row[QUESTION], options=options), answer, None, idx, LETTERS)
    if prompt_style != "sciknoweval":
        raise ValueError(f"data.prompt_style={prompt_style!r} is invalid: one of {PROMPT_STYLES} is accepted")
    options = "\n".join(f"{letter}: {row[columns[i]].strip()}" for letter, i in zip(LETTERS, order))
    prompt = f"{row[QUESTION].strip()}\n\n{options}\nPlease reason step by step."
    return MCQExample(prompt, answer, SYSTEM_PROMPT, idx, LETTERS)


def load_gpqa(
    data_dir: str | Path | None,
    subset: str = "diamond",
    *,
    seed: int = 0,
    domains: str | Sequence[str] | None = None,
    on_bad_row: str = "error",
    prompt_style: str = "reference",
) -> LoadedSplit:
    """The GPQA ``subset`` as four-option questions in ``prompt_style`` (one of :data:`PROMPT_STYLES`), ``idx``
    being the row index in the CSV.

    ``domains`` keeps only rows whose ``High-level domain`` is one of them (e.g. ``"Physics"``);
    a domain absent from the file is a ValueError listing those present. A bad row is a
    :class:`~demopsd.data.types.BadRowError` (``on_bad_row="error"``) or left out and counted (``"skip"``);
    the others keep their ``idx``.
    """
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"data.prompt_style={prompt_style!r} is invalid: one of {PROMPT_STYLES} is accepted")
    path = gpqa_path(data_dir, subset)
    if path.exists():
        checker, rows = RowChecker(str(path), on_bad_row, "line"), _read_csv(path)
    else:
        source = f"{HUB_DATASET} (config gpqa_{subset})"
        checker, rows = RowChecker(source, on_bad_row, "row"), list(enumerate(_read_hub(path, subset)))
    good = []  # (idx, row)
    for idx, (position, row) in enumerate(rows):
        problem = _row_problem(row)
        if problem:
            checker.bad(position, problem)
        else:
            good.append((idx, row))
    keep = _domain_filter(domains, {row[DOMAIN].strip() for _, row in good}, checker.source)
    kept = (
        to_example(row, idx, seed, prompt_style) for idx, row in good if keep is None or row[DOMAIN].strip() in keep
    )
    return checker.finish(kept, len(rows))


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """The data rows of the CSV at ``path``, each with the line it starts on (the header is line 1).

    The header must hold every column of ``COLUMNS``; a quoted field may span lines. A row shorter than the
    header lacks the values of its last columns (as with :class:`csv.DictReader`); blank lines are no rows.
    """
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [column for column in COLUMNS if column not in header]
        if missing:
            raise ValueError(f"{path}:1: missing GPQA columns {missing}; the header has {header}")
        rows, start = [], reader.line_num + 1
        for fields in reader:
            if fields:
                rows.append((start, dict(zip(header, fields))))
            start = reader.line_num + 1
        return rows


def _read_hub(path: Path, subset: str) -> list[dict]:
    """The rows of ``gpqa_<subset>`` from the gated hub dataset, or FileNotFoundError saying where the CSV goes."""
    try:
        import datasets

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        return list(datasets.load_dataset(HUB_DATASET, f"gpqa_{subset}", split="train"))
    except Exception as err:
        raise FileNotFoundError(
            f"GPQA data not found: put the official gpqa_{subset}.csv at {path} (set paths.data_dir or the "
            f"DEMOPSD_DATA_DIR environment variable to the directory holding gpqa/), or give this machine hub "
            f"access to the gated dataset {HUB_DATASET} (accept its terms, then `huggingface-cli login`). "
            f"The hub read failed: {type(err).__name__}: {err}"
        ) from err


def _row_problem(row: dict) -> str:
    """What is wrong with a GPQA row: an empty or missing question or answer text, or no domain ("" if nothing)."""
    empty = [column for column in (QUESTION, CORRECT, *INCORRECT) if not (row.get(column) or "").strip()]
    if empty:
        return f"empty or missing {', '.join(empty)}"
    if row.get(DOMAIN) is None:
        return f"no {DOMAIN!r} value"
    return ""


def _domain_filter(domains: str | Iterable[str] | None, present: set[str], source: str) -> set[str] | None:
    """The domains to keep (None: all), each checked against those ``present`` in ``source``."""
    if domains is None:
        return None
    wanted = {domains} if isinstance(domains, str) else set(domains)
    if not wanted:
        raise ValueError("domains is empty; pass None to keep every domain, or some of: " + ", ".join(sorted(present)))
    unknown = sorted(wanted - present)
    if unknown:
        raise ValueError(f"unknown GPQA domain(s) {unknown} in {source}; present: {', '.join(sorted(present))}")
    return wanted
