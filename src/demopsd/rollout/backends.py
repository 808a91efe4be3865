"""The rollout engine ``rollout.backend`` names: ``hf`` (:class:`GenerateEngine`) or ``vllm``
(:class:`demopsd.rollout.vllm.VLLMEngine`, imported only when asked for)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import RolloutConfig, VLLMRolloutConfig
from demopsd.rollout.engine import GenerateEngine, RolloutEngine


def engine_factory(
    rollout: RolloutConfig,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_model_len: int,
    seed: int,
) -> Callable[..., RolloutEngine]:
    """A function of the process's ``local_rank`` that builds the engine ``rollout`` (by its class, which
    ``rollout.backend`` picked) describes over ``policy``; the training module calls it once the processes are
    connected. vLLM is imported now, so a missing install fails before anything loads."""
    if not isinstance(rollout, VLLMRolloutConfig):
        return lambda local_rank=0: GenerateEngine(policy, tokenizer)
    from demopsd.rollout.vllm import VLLMEngine, import_vllm

    import_vllm()
    return partial(VLLMEngine, policy, tokenizer, rollout, max_model_len=max_model_len, seed=seed)
