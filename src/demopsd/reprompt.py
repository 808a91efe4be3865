"""Privileged context for the teacher (SDPO's "reprompting").

Rollouts arrive in consecutive groups of ``group_size`` per prompt. Rollout ``i`` is given as
context ``c`` a *successful* sibling ``j != i`` of its own group (reward at least
``success_threshold``), with thinking blocks removed and wrapped in ``demonstration_template``.
A rollout never sees its own solution: a success whose group has no other success gets no
demonstration. Optional fallback when there is no demonstration: the reference answer of its prompt.
A rollout left without context gets ``None`` and is masked out of the distillation loss by the caller.
(The reference's other fallback, environment feedback, is empty for multiple-choice rewards, so there is none.)

Only the teacher is shown ``c``; :func:`teacher_prompt` renders its user message. The student
keeps the plain prompt.

Defaults follow the SDPO reference release (lasgroup/SDPO, ``actor.yaml`` and the reprompting code
of its trainer): success threshold 0.5, no reprompting on one's own success, ``<think>`` blocks
stripped from demonstrations (which are otherwise the decoded response as it is), the first successful
sibling in group order as the demonstration, and the reference's reprompt text to the character:
``{prompt}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question.``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SELECTIONS = ("first", "random")


@dataclass(frozen=True)
class RepromptConfig:
    """How contexts are chosen and rendered."""

    template: str = "{prompt}\n{context}\n\nCorrectly solve the original question."
    """The teacher's user message; needs ``{prompt}`` and ``{context}``."""
    demonstration_template: str = "Correct solution:\n\n{solution}"
    answer_template: str = "The correct answer is {answer}."
    success_threshold: float = 0.5
    use_demonstrations: bool = True
    """Off: no sibling demonstrations, only the fallback (e.g. OPSD with the reference answer)."""
    use_reference_answer: bool = False
    remove_thinking: bool = True
    thinking_pattern: str = r"<think>.*?</think>\s*"
    """Regex (DOTALL) removed from demonstrations when ``remove_thinking`` is on."""
    selection: str = "first"
    """Which successful sibling: ``first`` in group order (SDPO) or ``random`` (seeded)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not one of {SELECTIONS}")
        for field, placeholders in (
            ("template", ("{prompt}", "{context}")),
            ("demonstration_template", ("{solution}",)),
            ("answer_template", ("{answer}",)),
        ):
            missing = [p for p in placeholders if p not in getattr(self, field)]
            if missing:
                raise ValueError(f"{field} must contain {' and '.join(placeholders)}; missing {', '.join(missing)}")


def build_contexts(
    completions: list[str],
    rewards: list[float],
    group_size: int,
    config: RepromptConfig,
    *,
    answers: list[str] | None = None,
    step: int = 0,
) -> list[str | None]:
    """The rendered context of every rollout, or None where it has none.

    ``completions``/``rewards`` hold one entry per rollout, groups consecutive;
    ``answers`` holds one reference answer per group (prompt). ``step`` seeds the random sibling
    choice together with ``config.seed``, so a step's contexts are reproducible.
    """
    n = len(completions)
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be an integer >= 1")
    if n % group_size:
        raise ValueError(f"{n} completions do not split into groups of group_size={group_size}; need a multiple")
    if len(rewards) != n:
        raise ValueError(f"got {len(rewards)} rewards for {n} completions; need one per completion")
    if config.use_reference_answer and (answers is None or len(answers) != n // group_size):
        got = "none" if answers is None else len(answers)
        raise ValueError(f"use_reference_answer needs one answer per group: got {got} for {n // group_size} groups")

    rng = random.Random(f"{config.seed}-{step}")
    contexts: list[str | None] = []
    for i in range(n):
        start = i - i % group_size
        siblings = [
            j for j in range(start, start + group_size) if j != i and rewards[j] >= config.success_threshold
        ]
        context = None
        if config.use_demonstrations and siblings:
            j = siblings[0] if config.selection == "first" else rng.choice(siblings)
            context = config.demonstration_template.format(solution=_demonstration(completions[j], config))
        elif config.use_reference_answer:
            context = config.answer_template.format(answer=answers[i // group_size])
        contexts.append(context)
    return contexts


def teacher_prompt(prompt: str, context: str, config: RepromptConfig) -> str:
    """The teacher's user message: ``prompt`` with its privileged ``context``."""
    return config.template.format(prompt=prompt, context=context)


def _demonstration(completion: str, config: RepromptConfig) -> str:
    if config.remove_thinking:
        completion = re.sub(config.thinking_pattern, "", completion, flags=re.DOTALL)
    return completion
