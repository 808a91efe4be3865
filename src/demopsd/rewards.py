"""Scoring of multiple-choice completions.

A completion is expected to follow the task's system prompt::

    <reasoning>
    ...
    </reasoning>
    <answer>
    B
    </answer>

The parser is strict so that the reward cannot be gamed. A completion is *well formed* only if

1. it holds exactly one ``<answer>`` tag and exactly one ``</answer>`` tag, the opening one first
   (tags are matched case-insensitively, so ``<ANSWER>`` counts as a second tag; two answer blocks
   are a format failure even if one of them is right);
2. the answer block is not nested in a reasoning block: every ``<reasoning>`` opened before it is
   closed before it (an answer written inside the reasoning does not count);
3. the block holds a single upper-case letter and nothing else but whitespace, so ``A: 0.8``,
   ``A or B``, ``(A)``, ``A.`` and the lower-case ``a`` are all format failures (the prompt asks
   for the option letter, and the options are upper-case);
4. that letter is one of the question's option letters.

A malformed completion earns no reward and has ``predicted=None``; a well-formed one earns 1.0
if its letter is the reference answer, else 0.0. Text outside the answer block is not inspected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OPEN = re.compile(r"<answer\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"</answer\s*>", re.IGNORECASE)
_REASONING_OPEN = re.compile(r"<reasoning\s*>", re.IGNORECASE)
_REASONING_CLOSE = re.compile(r"</reasoning\s*>", re.IGNORECASE)
_LETTER = re.compile(r"\s*([A-Z])\s*")


@dataclass(frozen=True)
class MCQScore:
    """Outcome of scoring one completion."""

    reward: float
    """1.0 if the completion is well formed and correct, else 0.0."""
    correct: bool
    well_formed: bool
    """False on any format failure (see the module docstring for the rules)."""
    predicted: str | None
    """The parsed option letter, or None when the completion is malformed."""


_MALFORMED = MCQScore(reward=0.0, correct=False, well_formed=False, predicted=None)


def parse_answer(completion: str, letters: str = "ABCD") -> str | None:
    """The option letter of a well-formed completion, or None on any format failure."""
    opens, closes = list(_OPEN.finditer(completion)), list(_CLOSE.finditer(completion))
    if len(opens) != 1 or len(closes) != 1 or closes[0].start() < opens[0].end():
        return None
    before = completion[: opens[0].start()]
    if len(_REASONING_OPEN.findall(before)) != len(_REASONING_CLOSE.findall(before)):
        return None
    match = _LETTER.fullmatch(completion[opens[0].end() : closes[0].start()])
    if match is None or match.group(1) not in letters:
        return None
    return match.group(1)


def score_mcq(completion: str, answer: str, letters: str = "ABCD") -> MCQScore:
    """Score ``completion`` against the reference letter ``answer`` among ``letters``.

    Raises ValueError if ``answer`` is not one of ``letters`` (a data error, not a model error).
    """
    if len(answer) != 1 or answer not in letters:
        raise ValueError(f"reference answer {answer!r} is not one of the option letters {letters!r}")
    predicted = parse_answer(completion, letters)
    if predicted is None:
        return _MALFORMED
    correct = predicted == answer
    return MCQScore(reward=float(correct), correct=correct, well_formed=True, predicted=predicted)
