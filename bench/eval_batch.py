"""One held-out evaluation batch, three ways: where the time of an evaluation goes and what each backend costs.

    python bench/eval_batch.py                                          # the laptop job's batch: 8 questions x 4
    python bench/eval_batch.py --model <dir> --questions 8 --k 4 --max-new-tokens 48 --kv-cache-bytes 1000000000

A batch of the synthetic task's held-out questions (the evaluation's ``batch_size``), ``k`` sampled answers each,
their full-vocabulary token entropy, and the letter probe on the same questions:

- *hf, entropy while sampling*: ``generate`` with the entropy recorded at each step (what evaluation does on the
  Hugging Face backend);
- *hf, entropy by a forward pass*: ``generate``, then a forward pass over prompts and answers to compute it (what
  evaluation did before, and still does after vLLM, which returns no full distribution);
- *vllm, entropy by a forward pass*: vLLM's sampling (``rollout=vllm``), then the same forward pass.

Each way runs once untimed, then ``--repeats`` times; the table gives the median seconds of sampling, entropy and
probe, and each way's total against the first. The two entropies of the same answers are compared token by token.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from demopsd.config.settings import EvalConfig, SamplingConfig
from demopsd.data.synthetic import generate_synthetic
from demopsd.data.types import student_conversation
from demopsd.evaluation.evaluate import answer_letter_probs, response_entropy
from demopsd.rollout.batch import encode_prompts
from demopsd.rollout.engine import generate_rollouts
from demopsd.runtime.models import DEFAULT_MODEL, load_model_and_tokenizer


def timed(step) -> tuple[object, float]:
    start = time.perf_counter()
    value = step()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--questions", type=int, default=8, help="questions in the batch (eval.batch_size)")
    parser.add_argument("--k", type=int, default=4, help="sampled answers per question")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-bytes", type=int, default=1_000_000_000, help="vLLM's KV cache on a CPU")
    parser.add_argument("--no-vllm", action="store_true", help="leave vLLM out")
    args = parser.parse_args()

    policy, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    policy.eval()
    questions = generate_synthetic("inferable", "test", seed=0, size=args.questions, balanced_letters=True)
    prompts = encode_prompts(tokenizer, [student_conversation(q) for q in questions])
    sampling = SamplingConfig(n=args.k, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    chunk, prefix = EvalConfig.chunk_size, EvalConfig.probe_prefix

    def probe() -> object:
        return answer_letter_probs(policy, tokenizer, prompts, questions, prefix)

    def while_sampling(sample) -> dict[str, float]:
        _, sample_seconds = timed(lambda: sample(entropy=True))
        return {"sampling": sample_seconds, "entropy": 0.0, "probe": timed(probe)[1]}

    def by_forward_pass(sample) -> dict[str, float]:
        rollouts, sample_seconds = timed(lambda: sample(entropy=False))
        _, entropy_seconds = timed(lambda: response_entropy(policy, rollouts, chunk))
        return {"sampling": sample_seconds, "entropy": entropy_seconds, "probe": timed(probe)[1]}

    def hf(entropy: bool):
        return generate_rollouts(policy, tokenizer, prompts, sampling, entropy=entropy)

    ways = {"hf, entropy while sampling": lambda: while_sampling(hf),
            "hf, entropy by a forward pass": lambda: by_forward_pass(hf)}
    if not args.no_vllm:
        from demopsd.rollout.vllm import EngineConfig, VLLMEngine

        engine = VLLMEngine(policy, tokenizer, EngineConfig(kv_cache_memory_bytes=args.kv_cache_bytes),
                            max_model_len=int(prompts.mask.sum(-1).max()) + args.max_new_tokens)
        ways["vllm, entropy by a forward pass"] = lambda: by_forward_pass(
            lambda entropy: engine.generate(prompts, sampling, entropy=entropy))

    torch.manual_seed(0)
    measured = generate_rollouts(policy, tokenizer, prompts, sampling, entropy=True)
    recomputed = response_entropy(policy, measured, chunk)
    difference = (measured.token_entropy[measured.response_mask.bool()] - recomputed).abs().max()

    medians = {}
    for name, way in ways.items():
        way()  # untimed
        runs = [way() for _ in range(args.repeats)]
        medians[name] = {phase: statistics.median(run[phase] for run in runs) for phase in runs[0]}

    print(f"{args.model} (float32) on {platform.machine()} CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{args.questions} questions x {args.k} answers, up to {args.max_new_tokens} tokens; median of "
          f"{args.repeats}; the entropy while sampling differs from the forward pass's by at most {difference:.1e} nats")
    print(f"{'way':34} {'sampling':>9} {'entropy':>8} {'probe':>6} {'total':>6} {'vs first':>8}")
    first = sum(next(iter(medians.values())).values())
    for name, phases in medians.items():
        total = sum(phases.values())
        print(f"{name:34} {phases['sampling']:9.2f} {phases['entropy']:8.2f} {phases['probe']:6.2f} {total:6.2f} "
              f"{total / first:7.2f}x")


if __name__ == "__main__":  # vLLM may start worker processes, which re-import this file
    main()
