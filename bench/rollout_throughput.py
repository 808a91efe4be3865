"""Rollout throughput of Hugging Face ``generate`` vs vLLM on the same prompts and sampling settings.

    python bench/rollout_throughput.py                           # default model, 32 prompts x 4 samples, 128 tokens
    python bench/rollout_throughput.py --model Qwen/Qwen3-8B --dtype bfloat16 --prompts 64 --n 8 --max-new-tokens 1024

Both backends run in this process, as in training (``rollout=hf`` / ``rollout=vllm``): the synthetic task's
prompts through the chat template, ``n`` samples each at temperature 1. Each backend gets one untimed warm-up
call, then ``--repeats`` timed calls; throughput counts the response tokens each backend produced (up to and
including end-of-sequence). The push of the policy's weights into the engine, which training pays once per
optimizer step, is timed too.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from demopsd.config.settings import SamplingConfig
from demopsd.data.synthetic import generate_synthetic
from demopsd.data.types import student_conversation
from demopsd.rollout.batch import encode_prompts
from demopsd.rollout.engine import generate_rollouts
from demopsd.rollout.vllm import EngineConfig, VLLMEngine
from demopsd.runtime.models import DEFAULT_MODEL, load_model_and_tokenizer


def timed(generate, repeats: int) -> tuple[int, float]:
    """Response tokens and seconds over ``repeats`` calls of ``generate`` after one warm-up call."""
    generate()
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        rollouts = generate()
        tokens += rollouts.num_tokens
        seconds += rollouts.seconds
    return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--kv-cache-bytes", type=int, default=None, help="vLLM KV cache size (CPU: e.g. 2000000000)")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    policy = policy.to(device).eval()
    examples = generate_synthetic("mixed", "train", seed=0, size=args.prompts)
    prompts = encode_prompts(tokenizer, [student_conversation(e) for e in examples])
    sampling = SamplingConfig(n=args.n, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    torch.manual_seed(0)
    threads = torch.get_num_threads()

    hf_tokens, hf_seconds = timed(lambda: generate_rollouts(policy, tokenizer, prompts, sampling), args.repeats)
    engine = VLLMEngine(
        policy,
        tokenizer,
        EngineConfig(gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=args.kv_cache_bytes),
        max_model_len=int(prompts.mask.sum(-1).max()) + args.max_new_tokens,
    )
    vllm_tokens, vllm_seconds = timed(lambda: engine.generate(prompts, sampling), args.repeats)
    engine.load_weights(policy)  # warm-up
    start = time.perf_counter()
    engine.load_weights(policy)
    push_seconds = time.perf_counter() - start

    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU"
    print(f"{args.model} ({args.dtype}) on {machine}, torch {torch.__version__}, {threads} threads")
    print(f"{args.prompts} prompts x {args.n} samples, up to {args.max_new_tokens} tokens, {args.repeats} timed calls")
    print(f"{'backend':8} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for name, tokens, seconds in (("hf", hf_tokens, hf_seconds), ("vllm", vllm_tokens, vllm_seconds)):
        print(f"{name:8} {tokens:8d} {seconds:8.1f} {tokens / seconds:9.1f}")
    print(f"vllm / hf throughput: {(vllm_tokens / vllm_seconds) / (hf_tokens / hf_seconds):.2f}x")
    print(f"weight push into the engine: {push_seconds:.2f} s")


if __name__ == "__main__":  # vLLM may start worker processes, which re-import this file
    main()
