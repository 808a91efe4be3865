"""Rollout engines: what samples responses from the policy's current weights, behind one protocol.

Callers (the training step, evaluation) hold a :class:`RolloutEngine` and never name a backend:
:class:`GenerateEngine` runs Hugging Face ``generate`` on the policy itself; :class:`demopsd.rollout.vllm.VLLMEngine`
keeps its own copy of the weights in a vLLM engine, pushed after each optimizer step, and sleeps while training runs.
:func:`demopsd.rollout.backends.engine_factory` builds the one ``rollout.backend`` names.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import SamplingConfig
from demopsd.rollout.batch import PromptBatch, RolloutBatch, eos_token_ids, repeat_prompts, response_mask


class RolloutEngine(Protocol):
    """Samples ``sampling.n`` responses per prompt (one for ``greedy``) from the policy's current weights."""

    uses_policy_weights: bool
    """Whether the engine runs the policy module itself (a sharded policy must then be gathered around
    :meth:`generate`) rather than a copy of its weights."""

    def generate(
        self, prompts: PromptBatch, sampling: SamplingConfig, *, greedy: bool = False, entropy: bool = False
    ) -> RolloutBatch:
        """Rows grouped by prompt as :class:`RolloutBatch` says, on the policy's device. ``entropy``: fill
        :attr:`RolloutBatch.token_entropy` if the engine can measure it while sampling (else it stays None)."""

    def policy_updated(self) -> None:
        """The policy's weights changed (an optimizer step): the next :meth:`sync` must bring them in."""

    def sync(self) -> None:
        """Make the engine ready to generate from the policy's current weights: bring them in if they changed, and
        wake an engine that sleeps between generations; a collective under sharding (every process calls it
        together). Evaluation calls it first, so that its generations (the policy in eval mode, unchanged) need
        no collective: each process may then generate alone."""


class GenerateEngine:
    """``generate`` on the live policy: always up to date, nothing to sync."""

    uses_policy_weights = True

    def __init__(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.policy, self.tokenizer = policy, tokenizer

    def generate(
        self, prompts: PromptBatch, sampling: SamplingConfig, *, greedy: bool = False, entropy: bool = False
    ) -> RolloutBatch:
        return generate_rollouts(self.policy, self.tokenizer, prompts, sampling, greedy=greedy, entropy=entropy)

    def policy_updated(self) -> None:
        pass

    def sync(self) -> None:
        pass


@torch.no_grad()
def generate_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: PromptBatch,
    sampling: SamplingConfig,
    *,
    greedy: bool = False,
    entropy: bool = False,
) -> RolloutBatch:
    """Sample ``sampling.n`` responses per prompt with Hugging Face ``generate`` on the live weights.

    ``greedy``: one deterministic response per prompt (``n``, temperature and top-p are ignored).
    ``entropy``: also measure each response token's full-vocabulary entropy (:class:`StepEntropy`), at no extra
    forward pass.
    Each prompt is read once, not once per response: ``generate`` starts from :func:`shared_prompt_cache`.
    """
    device = model.device
    copies = 1 if greedy else sampling.n
    prompt = repeat_prompts(prompts, copies, device)
    decoding = (
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        if greedy
        else {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    )
    eos_ids = eos_token_ids(model, tokenizer)
    step_entropy = StepEntropy() if entropy else None
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    sequences = model.generate(
        input_ids=prompt.ids,
        attention_mask=prompt.mask,
        past_key_values=shared_prompt_cache(model, repeat_prompts(prompts, 1, device), copies),
        **decoding,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([] if step_entropy is None else [step_entropy]),
        synced_gpus=False,  # a sharded model's weights are gathered first (demopsd.runtime.sharding): no process waits
    )
    seconds = time.perf_counter() - start
    model.train(was_training)
    response_ids = sequences[:, prompt.ids.shape[1] :]
    mask = response_mask(response_ids, eos_ids)
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    token_entropy = None if step_entropy is None else step_entropy.entropy().masked_fill(mask == 0, 0)
    return RolloutBatch(prompt=prompt, response_ids=response_ids, response_mask=mask, texts=texts, seconds=seconds,
                        group_size=copies, token_entropy=token_entropy)


class StepEntropy(LogitsProcessor):
    """Records, at each step of ``generate``, the full-vocabulary entropy of every row's next-token distribution,
    and leaves the logits as they are.

    ``generate`` applies the processors it is given before its temperature and top-p warpers, so these are the
    model's own distributions, those :func:`demopsd.objectives.chunked_token_log_probs` recomputes from hidden
    states. Memory: one float per row per step.
    """

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.float().softmax(-1)
        self.steps.append(-torch.special.xlogy(probs, probs).sum(-1))
        return scores

    def entropy(self) -> torch.Tensor:
        """``[rows, steps]``: column ``t`` is the entropy of the distribution response token ``t`` was drawn from."""
        return torch.stack(self.steps, dim=1)


def shared_prompt_cache(model: PreTrainedModel, prompts: PromptBatch, copies: int) -> DynamicCache | None:
    """The key/value cache of every prompt but its last token, computed once per prompt and repeated for each of
    its ``copies`` rows: ``generate`` on the repeated prompts ``[B*copies, P]`` then reads only their last column.

    ``prompts``: left-padded ``[B, P]``; positions count from each prompt's first real token, as ``generate``
    counts them. The padded positions hold states that the attention mask hides. None for one-token prompts.
    """
    if prompts.ids.shape[1] < 2:
        return None
    cache = DynamicCache(config=model.config)
    mask = prompts.mask[:, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    model(input_ids=prompts.ids[:, :-1], attention_mask=mask, position_ids=positions, past_key_values=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(copies)
    return cache
