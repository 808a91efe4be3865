"""What every dataset is made of: the multiple-choice example, the task's system prompt, and the checking of
rows read from a file (bad rows are an error naming ``<path>:<line>``, or skipped and counted)."""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from demopsd.config.sections import ON_BAD_ROW

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
OPTION_LINE = re.compile(r"^([A-Z]): ", re.MULTILINE)
OPTION_TEXT_LINE = re.compile(r"^([A-Z]): (.*)$", re.MULTILINE)
_REASONS_SHOWN = 5  # bad rows listed in the warning of a skip, the rest only counted


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MCQExample:
    """One multiple-choice question."""

    prompt: str
    """The user message: question, ``A: ...`` option lines, then "Please reason step by step." (GPQA's
    ``reference`` layout differs: see :mod:`demopsd.data.gpqa`)."""
    answer: str
    """The correct option letter."""
    system: str | None
    """The system prompt, or None for none (GPQA as the reference asks it)."""
    idx: int
    letters: str
    """The option letters present in the prompt, e.g. ``"ABCD"`` or ``"AB"``."""
    reward_rule: str = "answer_tag"
    """How a completion is scored (``data.reward``; see :mod:`demopsd.data.rewards`)."""


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
    """The chat the policy answers: the task's system prompt (where it has one), then the question."""
    system = [] if example.system is None else [{"role": "system", "content": example.system}]
    return [*system, {"role": "user", "content": example.prompt}]


def render_prompt(tokenizer, conversation: list[dict[str, str]], chat_template_kwargs: dict | None = None) -> str:
    """``conversation`` as the text the model reads: the tokenizer's chat template plus the generation prompt
    (``chat_template_kwargs`` such as ``enable_thinking`` passed on), as
    :func:`demopsd.rollout.batch.encode_prompts` renders it, so that a length checked here is the length the
    model is given."""
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
    )


def option_texts(prompt: str) -> dict[str, str]:
    """Letter → text of each ``X: ...`` option line of ``prompt``, in order."""
    return {letter: text for letter, text in OPTION_TEXT_LINE.findall(prompt)}


def option_letters(prompt: str) -> str:
    """The option letters of ``prompt``, from its ``X: ...`` lines; they must run A, B, C, ..."""
    letters = "".join(OPTION_LINE.findall(prompt))
    if not letters or letters != string.ascii_uppercase[: len(letters)]:
        raise ValueError(f"prompt has option lines {letters!r}, expected consecutive letters from 'A': {prompt!r}")
    return letters


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$DEMOPSD_DATA_DIR``, else ``./data``."""
    return Path(data_dir or os.environ.get("DEMOPSD_DATA_DIR") or "data").expanduser()
