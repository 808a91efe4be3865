"""The rollout engine ``rollout.backend`` names: ``hf`` (:class:`GenerateEngine`) or ``vllm``
(:class:`demopsd.rollout.vllm.VLLMEngine`, imported only when asked for)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import ROLLOUT_BACKENDS, EngineConfig
from demopsd.rollout.engine import GenerateEngine, RolloutEngine


def engine_factory(
    backend: str,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    engine: EngineConfig,
    *,
    max_model_len: int,
    seed: int,
) -> Callable[..., RolloutEngine]:
    """A function of the process's ``local_rank`` that builds the engine of ``backend`` over ``policy``; the
    training module calls it once the processes are connected. vLLM is imported now, so a missing install
    fails before anything loads."""
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"rollout.backend={backend!r} is invalid: one of {ROLLOUT_BACKENDS} is accepted")
    if backend == "hf":
        return lambda local_rank=0: GenerateEngine(policy, tokenizer)
    from demopsd.rollout.vllm import VLLMEngine, import_vllm

    import_vllm()
    return partial(VLLMEngine, policy, tokenizer, engine, max_model_len=max_model_len, seed=seed)
