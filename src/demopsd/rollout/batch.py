"""Rollout batches: chat prompts in, sampled responses out, as padded token tensors the trainer can score.

Layout used across the project: a batch of sequences is a left-padded prompt block ``[B, P]`` followed
by a right-padded response block ``[B, R]``; the hidden state at column ``P - 1 + t`` predicts
response token ``t``, whatever the prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Conversation = list[dict[str, str]]


@dataclass
class PromptBatch:
    """Left-padded prompt tokens: ``ids`` and ``mask`` are ``[B, P]``."""

    ids: torch.Tensor
    mask: torch.Tensor


@dataclass
class RolloutBatch:
    """``n = group_size`` responses per prompt, grouped consecutively (rows ``i*n .. i*n+n-1`` share prompt ``i``).

    ``prompt`` is ``[B*n, P]``; ``response_ids`` / ``response_mask`` are ``[B*n, R]``, the mask covering
    the generated tokens up to and including the first end-of-sequence token. ``log_probs`` ``[B*n, R]`` holds
    the sampler's log-probability of each response token when it is not the trainer's live model (vLLM);
    ``None`` means the rollouts came from the policy being trained, so its own values are ``log π_old``.
    ``token_entropy`` ``[B*n, R]`` holds the full-vocabulary entropy of the sampler's distribution at each response
    token, before temperature and top-p, where the engine measured it while sampling (``generate`` asked for it);
    ``None`` otherwise.
    ``group_size`` is set by the engine that sampled the rows; ``None`` for rows cut out of a batch
    (:func:`demopsd.training.batching.select_rows`), which need not hold whole groups.
    """

    prompt: PromptBatch
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    texts: list[str]
    seconds: float
    group_size: int | None
    log_probs: torch.Tensor | None = None
    token_entropy: torch.Tensor | None = None

    def __post_init__(self) -> None:
        rows = self.response_ids.shape[0]
        if self.group_size is not None and (self.group_size < 1 or rows % self.group_size):
            raise ValueError(f"{rows} rollouts do not split into groups of group_size={self.group_size}")

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with its tensors on ``device``."""
        return RolloutBatch(
            prompt=PromptBatch(ids=self.prompt.ids.to(device), mask=self.prompt.mask.to(device)),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
            texts=self.texts,
            seconds=self.seconds,
            group_size=self.group_size,
            log_probs=None if self.log_probs is None else self.log_probs.to(device),
            token_entropy=None if self.token_entropy is None else self.token_entropy.to(device),
        )


def repeat_prompts(prompts: PromptBatch, copies: int, device: torch.device | str | None = None) -> PromptBatch:
    """Each prompt row ``copies`` times in a row (``[B*copies, P]``), as the rollouts of a batch are grouped."""
    return PromptBatch(
        ids=prompts.ids.repeat_interleave(copies, dim=0).to(device),
        mask=prompts.mask.repeat_interleave(copies, dim=0).to(device),
    )


TRUNCATION = ("error", "left", "right")
"""What :func:`encode_prompts` does with a prompt over its limit: refuse it, or cut tokens from that side."""


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Conversation],
    *,
    max_tokens: int | None = None,
    truncation: str = "error",
    chat_template_kwargs: dict | None = None,
) -> PromptBatch:
    """Render each conversation with the chat template (plus the generation prompt) and left-pad.

    A prompt of more than ``max_tokens`` tokens (None: no limit) is, as ``truncation`` says, an error naming it
    (``"error"``) or cut to its first (``"right"``: the end is dropped) or last (``"left"``) ``max_tokens``
    tokens. The reference cuts its teacher's prompts on the right at 10,240 tokens (``max_reprompt_len``,
    ``reprompt_truncation: right``), which drops the end of the chat template too (the generation prompt).
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r} is invalid: one of {TRUNCATION} is accepted")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid: None or an integer >= 1 is accepted")
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {}))
        for c in conversations
    ]
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = [len(row) for row in rows]
    if max_tokens is not None and max(lengths) > max_tokens:
        if truncation == "error":
            longest = max(range(len(rows)), key=lengths.__getitem__)
            raise ValueError(
                f"prompt {longest} of the batch has {lengths[longest]} tokens, more than the limit of {max_tokens}; "
                "raise the limit (data.max_prompt_tokens for the student's prompts, method.reprompt.max_prompt_tokens "
                "for the teacher's) or shorten the prompt"
            )
        rows = [row[:max_tokens] if truncation == "right" else row[-max_tokens:] for row in rows]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return PromptBatch(ids=ids, mask=mask)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def response_mask(response_ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """``[B, R]`` mask of the tokens up to and including the first EOS of each row (all if none)."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device)).long()
    eos_before = is_eos.cumsum(-1) - is_eos
    return (eos_before == 0).long()
