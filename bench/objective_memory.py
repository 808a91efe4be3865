"""Peak memory and time of the DemoPSD loss (forward + backward): chunked from hidden states vs full logits.

    python bench/objective_memory.py                 # V = 151,936, H = 1,024, N = 512 .. 4,096
    python bench/objective_memory.py --tokens 256 512 --vocab 32000

Each measurement runs in a fresh subprocess, so that its peak resident memory (``ru_maxrss``) is its own;
"extra" is that peak minus the resident memory after the inputs were built, i.e. what the loss itself
needs. Both paths compute the same loss and gradients (see tests/objectives/test_losses.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(path: str, tokens: int, vocab: int, hidden: int, chunk: int) -> dict:
    import torch

    from demopsd.config.objectives import DistillationConfig
    from demopsd.objectives import chunked_distillation_loss, distillation_loss

    torch.manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, requires_grad=True)
    head = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    teacher_hidden = student_hidden.detach() + 0.1 * torch.randn(tokens, hidden)
    teacher_head = head.detach().clone()
    ids = torch.randint(0, vocab, (tokens,))
    weights = torch.full((tokens,), 1.0 / tokens)
    config = DistillationConfig()  # DemoPSD defaults: top-100 + tail, JSD α = 0.5, exp blend
    baseline = rss_mib()
    start = time.perf_counter()
    if path == "chunked":
        loss, _ = chunked_distillation_loss(
            student_hidden, head, teacher_hidden, teacher_head, ids, weights, config, chunk_size=chunk
        )
    else:
        loss, _ = distillation_loss(student_hidden @ head.T, teacher_hidden @ teacher_head.T, ids, weights, config)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "tokens": tokens, "seconds": seconds, "extra_mib": peak - baseline, "loss": float(loss)}


def run_child(args, path: str, tokens: int) -> dict:
    command = [sys.executable, __file__, "--child", path, "--tokens", str(tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"path": path, "tokens": tokens, "error": done.stderr.strip().splitlines()[-1] if done.stderr else
                f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--child", choices=["chunked", "full"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens[0], args.vocab, args.hidden, args.chunk)))
        return

    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; V={args.vocab}, H={args.hidden}, chunk={args.chunk}")
    print(f"{'N':>6} | {'full MiB':>9} {'full s':>7} | {'chunked MiB':>11} {'chunked s':>9} | {'memory':>7} {'time':>6} | loss diff")
    for tokens in args.tokens:
        full, chunked = run_child(args, "full", tokens), run_child(args, "chunked", tokens)
        if "error" in full or "error" in chunked:
            print(f"{tokens:>6} | full: {full.get('error', 'ok')} | chunked: {chunked.get('error', 'ok')}")
            continue
        print(f"{tokens:>6} | {full['extra_mib']:>9.0f} {full['seconds']:>7.2f} | {chunked['extra_mib']:>11.0f} "
              f"{chunked['seconds']:>9.2f} | {chunked['extra_mib'] / full['extra_mib']:>6.2f}x "
              f"{chunked['seconds'] / full['seconds']:>5.2f}x | {abs(full['loss'] - chunked['loss']):.1e}")


if __name__ == "__main__":
    main()
