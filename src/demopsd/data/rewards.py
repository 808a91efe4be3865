"""Scoring of multiple-choice completions, under one of three rules (``data.reward``).

A completion is expected to follow the task's system prompt::

    <reasoning>
    ...
    </reasoning>
    <answer>
    B
    </answer>

- ``answer_tag`` (SciKnowEval and the synthetic task; the SDPO reference's ``feedback/mcq.py``): the prediction
  is the text after the last ``<answer>`` up to the next ``</answer>`` (or the end), stripped; reward 1 when it
  equals the answer letter. An unclosed tag, two answer blocks or a missing tag can still be right. *Well formed*
  is the reference's format check: the completion ends with ``<answer>``, one option letter, ``</answer>``
  (whitespace allowed around the letter and at the very end).
- ``last_letter`` (GPQA; the reference's ``feedback/gpqa.py``): the prediction is the last option letter standing
  alone as a word in the upper-cased completion (else the whole stripped completion); well formed when that is
  an option letter.
- ``strict``: well formed only if

  1. it holds exactly one ``<answer>`` tag and exactly one ``</answer>`` tag, the opening one first
     (tags are matched case-insensitively, so ``<ANSWER>`` counts as a second tag; two answer blocks
     are a format failure even if one of them is right);
  2. the answer block is not nested in a reasoning block: every ``<reasoning>`` opened before it is
     closed before it (an answer written inside the reasoning does not count);
  3. the block holds a single upper-case letter and nothing else but whitespace, so ``A: 0.8``,
     ``A or B``, ``(A)``, ``A.`` and the lower-case ``a`` are all format failures;
  4. that letter is one of the question's option letters;

  and a malformed completion earns no reward. Text outside the answer block is not inspected.

Under every rule ``predicted`` is the parsed option letter, or None when the prediction is not an option letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from demopsd.config.settings import REWARD_RULES

_OPEN = re.compile(r"<answer\s*>", re.IGNORECASE)
_CLOSE = re.compile(r"</answer\s*>", re.IGNORECASE)
_REASONING_OPEN = re.compile(r"<reasoning\s*>", re.IGNORECASE)
_REASONING_CLOSE = re.compile(r"</reasoning\s*>", re.IGNORECASE)
_LETTER = re.compile(r"\s*([A-Z])\s*")


@dataclass(frozen=True)
class MCQScore:
    """Outcome of scoring one completion."""

    reward: float
    """1.0 if the rule's prediction is the answer, else 0.0 (under ``strict`` only a well-formed one can be)."""
    correct: bool
    well_formed: bool
    """The rule's format check (see the module docstring)."""
    predicted: str | None
    """The parsed option letter, or None when the prediction is not one of the option letters."""


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


def answer_tag_prediction(completion: str) -> str:
    """The text after the last ``<answer>`` up to the next ``</answer>`` or the end, stripped (the whole
    stripped completion when it has no ``<answer>``)."""
    return completion.split("<answer>")[-1].split("</answer>")[0].strip()


def ends_with_answer_block(completion: str, letters: str) -> bool:
    """The reference's format check: the completion ends with ``<answer>``, one option letter, ``</answer>``."""
    return re.search(rf"<answer>\s*[{re.escape(letters)}]\s*</answer>$", completion) is not None


def last_letter_prediction(completion: str, letters: str) -> str:
    """The last option letter standing alone in the upper-cased completion, else the stripped completion,
    without trailing ``.`` or ``/``."""
    found = re.findall(rf"\b([{re.escape(letters)}])\b", completion.upper())
    prediction = found[-1] if found else completion.strip().strip(".")
    return prediction.rstrip(".").rstrip("/")


def score_mcq(completion: str, answer: str, letters: str = "ABCD", rule: str = "answer_tag") -> MCQScore:
    """Score ``completion`` against the reference letter ``answer`` among ``letters`` under ``rule``.

    Raises ValueError if ``answer`` is not one of ``letters`` (a data error, not a model error) or ``rule`` is
    not one of :data:`REWARD_RULES`.
    """
    if len(answer) != 1 or answer not in letters:
        raise ValueError(f"reference answer {answer!r} is not one of the option letters {letters!r}")
    if rule == "answer_tag":
        prediction = answer_tag_prediction(completion)
        return scored(prediction, answer, letters, ends_with_answer_block(completion, letters))
    if rule == "last_letter":
        prediction = last_letter_prediction(completion, letters)
        return scored(prediction, answer, letters, prediction in tuple(letters))
    if rule != "strict":
        raise ValueError(f"data.reward={rule!r} is invalid: one of {REWARD_RULES} is accepted")
    predicted = parse_answer(completion, letters)
    return _MALFORMED if predicted is None else scored(predicted, answer, letters, well_formed=True)


def scored(prediction: str, answer: str, letters: str, well_formed: bool) -> MCQScore:
    correct = prediction == answer
    predicted = prediction if prediction in tuple(letters) else None
    return MCQScore(reward=float(correct), correct=correct, well_formed=well_formed, predicted=predicted)
