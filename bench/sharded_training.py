"""Model state each process holds, and the time of a training step: trainer=fsdp against trainer=ddp.

    python bench/sharded_training.py                       # the default model, 2 CPU processes over gloo
    python bench/sharded_training.py --rows 8 --response-tokens 128 --steps 4

Each process trains the default model (SmolLM2-135M, fp32) on its own rows of random prompt and response
tokens with the DemoPSD loss. A step is the student forward, the EMA teacher's forward with a longer
prompt, the chunked loss, backward, AdamW and the EMA update. The work is the same under both; only the
parallelism differs:
* ``ddp``: torch's DistributedDataParallel, the whole policy, teacher, gradients and AdamW state per process;
* ``fsdp``: :func:`demopsd.runtime.sharding.shard_model` on the policy and the teacher (fp32 gather, as on a CPU).

"state" counts the bytes of the weights, gradients and optimizer state each process holds after a step
(the local shards under FSDP), read from the tensors themselves. "step" is the mean time of the steps
after the first. Rollout generation is not part of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MIB = 2**20


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def state_bytes(policy, teacher, optimizer) -> dict[str, float]:
    import torch

    optimizer_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    return {
        "policy_mib": local_bytes(policy.parameters()) / MIB,
        "teacher_mib": local_bytes(teacher.parameters()) / MIB,
        "gradients_mib": local_bytes(p.grad for p in policy.parameters() if p.grad is not None) / MIB,
        "adamw_mib": local_bytes(optimizer_tensors) / MIB,
    }


def worker(rank: int, args, mode: str, store_path: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from demopsd.config.objectives import DistillationConfig
    from demopsd.config.settings import ShardingConfig
    from demopsd.objectives import chunked_distillation_loss
    from demopsd.rollout.batch import PromptBatch
    from demopsd.rollout.forward import lm_head_weight, response_hidden_states
    from demopsd.runtime.models import DEFAULT_MODEL, load_model_and_tokenizer
    from demopsd.runtime.sharding import reshard, shard_model
    from demopsd.training.teacher import ema_update, make_ema_teacher

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, args.processes), rank=rank,
                            world_size=args.processes)
    policy, _ = load_model_and_tokenizer(DEFAULT_MODEL)
    policy.train()
    teacher = make_ema_teacher(policy)
    if mode == "fsdp":
        config = ShardingConfig(param_dtype="float32", activation_checkpointing=args.activation_checkpointing)
        mesh = init_device_mesh("cpu", (args.processes,))
        shard_model(policy, mesh, config)
        shard_model(teacher, mesh, config)
        forward_model = policy
    else:
        if args.activation_checkpointing:
            policy.gradient_checkpointing_enable({"use_reentrant": False})
        forward_model = DistributedDataParallel(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    generator = torch.Generator().manual_seed(1000 + rank)  # each process its own rows, the same in both modes
    vocab = policy.config.vocab_size

    def tokens(columns: int):
        return torch.randint(0, vocab, (args.rows, columns), generator=generator)

    response = tokens(args.response_tokens)
    response_mask = torch.ones_like(response)
    student_prompt = PromptBatch(tokens(args.prompt_tokens), torch.ones(args.rows, args.prompt_tokens, dtype=torch.long))
    teacher_ids = tokens(2 * args.prompt_tokens)
    teacher_prompt = PromptBatch(teacher_ids, torch.ones_like(teacher_ids))
    valid = response_mask.bool()
    weights = torch.full((int(valid.sum()),), 1.0 / (valid.sum().item() * args.processes))

    seconds, losses = [], []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        student_hidden = response_hidden_states(forward_model, student_prompt, response, response_mask)
        with torch.no_grad():
            teacher_hidden = response_hidden_states(teacher, teacher_prompt, response, response_mask)
        loss, _ = chunked_distillation_loss(
            student_hidden[valid], lm_head_weight(policy), teacher_hidden[valid], lm_head_weight(teacher).detach(),
            response[valid], weights, DistillationConfig(), chunk_size=512,
        )
        reshard(teacher)
        loss.backward()
        measured = state_bytes(policy, teacher, optimizer)  # gradients present, AdamW state from earlier steps
        optimizer.step()
        ema_update(teacher, policy, 0.05)
        optimizer.zero_grad()
        dist.barrier()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    measured = {**measured, "adamw_mib": state_bytes(policy, teacher, optimizer)["adamw_mib"]}
    if rank == 0:
        Path(out_path).write_text(json.dumps({
            "mode": mode, **measured, "state_mib": sum(measured.values()),
            "step_s": sum(seconds[1:]) / max(len(seconds) - 1, 1), "first_step_s": seconds[0], "losses": losses,
        }))
    dist.destroy_process_group()


def run(args, mode: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(args, mode, os.path.join(tmp, "store"), out), nprocs=args.processes)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rows", type=int, default=4, help="responses per process and step")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    args = parser.parse_args()

    results = {mode: run(args, mode) for mode in ("ddp", "fsdp")}
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {args.processes} processes × {args.threads} thread(s); "
          f"{args.rows} rows × ({args.prompt_tokens} prompt + {args.response_tokens} response) tokens per process; "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}")
    columns = ("policy_mib", "teacher_mib", "gradients_mib", "adamw_mib", "state_mib", "step_s")
    print("| trainer | " + " | ".join(columns) + " |")
    print("|---|" + "--:|" * len(columns))
    for mode, result in results.items():
        print(f"| {mode} | " + " | ".join(f"{result[c]:.1f}" if c != "step_s" else f"{result[c]:.2f}"
                                          for c in columns) + " |")
    ddp, fsdp = results["ddp"], results["fsdp"]
    print(f"fsdp / ddp: state {fsdp['state_mib'] / ddp['state_mib']:.2f}×, step time {fsdp['step_s'] / ddp['step_s']:.2f}×")
    print(f"losses per step (rank 0) ddp {ddp['losses']} fsdp {fsdp['losses']}")


if __name__ == "__main__":
    main()
