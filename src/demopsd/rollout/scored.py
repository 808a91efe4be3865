"""A training step's rollouts: every question of the batch sampled ``sampling.n`` times by the rollout engine, and
each response scored by its question's reward rule."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from demopsd.config.settings import PromptConfig, SamplingConfig
from demopsd.data.rewards import MCQScore, score_mcq
from demopsd.data.types import MCQExample, student_conversation
from demopsd.rollout.batch import RolloutBatch, encode_prompts
from demopsd.rollout.engine import RolloutEngine


def scored_rollouts(
    engine: RolloutEngine,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[MCQExample],
    sampling: SamplingConfig,
    prompts: PromptConfig,
) -> tuple[RolloutBatch, list[MCQExample], list[MCQScore]]:
    """The rollouts of ``examples`` (the student's chat prompts, at most ``prompts.max_prompt_tokens`` long), the
    question each row answers and each row's score. A sharded policy that ``engine`` runs itself must be gathered
    around the call (:func:`demopsd.runtime.sharding.gathered`)."""
    encoded = encode_prompts(
        tokenizer,
        [student_conversation(e) for e in examples],
        max_tokens=prompts.max_prompt_tokens,
        chat_template_kwargs=prompts.chat_template_kwargs,
    )
    rollouts = engine.generate(encoded, sampling)
    rows = [e for e in examples for _ in range(rollouts.group_size)]
    scores = [score_mcq(text, e.answer, e.letters, e.reward_rule) for text, e in zip(rollouts.texts, rows)]
    return rollouts, rows, scores
