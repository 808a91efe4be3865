"""Gradient clipping of sharded gradients (trainer=fsdp): the norm is the whole gradient's, over every process's
shards, so two processes clip exactly as one unsharded model does."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from demopsd.config.settings import OptimConfig, ShardingConfig
from demopsd.runtime.sharding import shard_model
from demopsd.training.module import SelfDistillationModule
from tests.helpers import spawn_processes, tiny_llama

pytestmark = pytest.mark.slow

WORLD, MAX_NORM = 2, 0.05
INPUT = torch.arange(24).remainder(64).view(2, 12)


def loss_of(model) -> torch.Tensor:
    return model(input_ids=INPUT, use_cache=False).logits.float().logsumexp(-1).mean()


def clipped(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The module's clipping on ``model``'s gradients: the norm it returns and the whole gradients after it."""
    holder = SimpleNamespace(policy=model, optim=OptimConfig(grad_clip=MAX_NORM))
    norm = SelfDistillationModule.clip_gradient_norm(holder)
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for name, p in model.named_parameters()}
    return norm, grads


def sharded_process(rank: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(str(out / "store"), WORLD), rank=rank, world_size=WORLD)
    try:
        model = tiny_llama().train()
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",))
        shard_model(model, mesh, ShardingConfig(param_dtype="float32", activation_checkpointing=False))
        loss_of(model).backward()  # the same batch on both: the averaged gradient is the unsharded one
        torch.save(clipped(model), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_gradients_are_clipped_by_the_whole_norm(tmp_path):
    spawn_processes(sharded_process, (tmp_path,), WORLD, tmp_path)
    model = tiny_llama().train()
    loss_of(model).backward()
    unclipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    norm, grads = clipped(model)
    assert unclipped > 4 * MAX_NORM  # the clip acts
    assert float(norm) == pytest.approx(float(unclipped), rel=1e-6)
    for rank in range(WORLD):
        sharded_norm, sharded_grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert float(sharded_norm) == pytest.approx(float(unclipped), rel=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(sharded_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
