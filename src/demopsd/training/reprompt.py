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

from demopsd.config.settings import RepromptConfig


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
    choice together with ``config.seed``, so a step's contexts are reproducible. Under ``config.placebo`` each group
    gets the contexts built for the next group (the last the first's).
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
    for i, siblings in enumerate(successful_siblings(rewards, group_size, config.success_threshold)):
        context = None
        if config.use_demonstrations and siblings:
            j = siblings[0] if config.selection == "first" else rng.choice(siblings)
            context = config.demonstration_template.format(solution=_demonstration(completions[j], config))
        elif config.use_reference_answer:
            context = config.answer_template.format(answer=answers[i // group_size])
        contexts.append(context)
    return contexts[group_size:] + contexts[:group_size] if config.placebo else contexts


def successful_siblings(rewards: list[float], group_size: int, threshold: float) -> list[list[int]]:
    """For each rollout, the other rollouts of its group (consecutive runs of ``group_size``) whose reward is at
    least ``threshold``: the candidates for its demonstration."""
    return [
        [j for j in range(i - i % group_size, i - i % group_size + group_size) if j != i and rewards[j] >= threshold]
        for i in range(len(rewards))
    ]


def demonstration_fraction(rewards: list[float], group_size: int, config: RepromptConfig) -> float:
    """The share of rollouts whose context is a successful sibling's answer (0 with demonstrations off)."""
    if not config.use_demonstrations or not rewards:
        return 0.0
    siblings = successful_siblings(rewards, group_size, config.success_threshold)
    return sum(bool(s) for s in siblings) / len(rewards)


def teacher_prompt(prompt: str, context: str, config: RepromptConfig) -> str:
    """The teacher's user message: ``prompt`` with its privileged ``context``."""
    return config.template.format(prompt=prompt, context=context)


def _demonstration(completion: str, config: RepromptConfig) -> str:
    if config.remove_thinking:
        completion = re.sub(config.thinking_pattern, "", completion, flags=re.DOTALL)
    return completion
