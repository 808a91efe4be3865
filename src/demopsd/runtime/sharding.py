"""Fully sharded data parallel (FSDP2) for the policy and its EMA teacher, through Lightning.

``trainer=fsdp`` runs :class:`FullyShardedStrategy`: each of the W processes keeps 1/W of every weight,
gradient and optimizer state. :func:`shard_model` makes each decoder layer one unit that is all-gathered
just before its forward (and again in backward) and freed after it; the embeddings, the final norm and the
LM head form the root unit, which stays gathered from the forward until the end of backward, so the
objectives can use the LM-head weight after the forward (:func:`demopsd.rollout.forward.lm_head_weight`).

Generation decodes one token per forward: :func:`gathered` all-gathers every unit once for a whole
``generate`` call (or an evaluation) instead of once per token. A model that is not sharded passes through
every function here unchanged, so the same code runs under ``trainer=default`` and ``trainer=ddp``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import ShardingConfig
from demopsd.runtime.models import DTYPES

# FSDP warns that an in-place change of a view among a unit's outputs would skip its backward hook; the
# outputs of the models here (hidden states, logits) are only ever read.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's :class:`ModelParallelStrategy` with every process in the one data-parallel dimension (no
    tensor parallelism): plain FSDP over all devices of all nodes. The module applies the sharding in its
    ``configure_model`` hook; checkpoints are sharded (a directory with one file per process)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def shard_model(model: PreTrainedModel, mesh: DeviceMesh, config: ShardingConfig) -> None:
    """Shard ``model`` in place over the 1-D ``mesh``: one FSDP unit per decoder layer (the classes the model
    names in ``_no_split_modules``), the remaining weights in the root unit."""
    layer_classes = set(model._no_split_modules or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder-layer class in _no_split_modules, which trainer=fsdp shards by"
        )
    if config.activation_checkpointing and any(p.requires_grad for p in model.parameters()):
        # transformers 5 renamed gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    precision = MixedPrecisionPolicy(param_dtype=DTYPES[config.param_dtype], reduce_dtype=DTYPES[config.reduce_dtype])
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=precision, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=precision, reshard_after_forward=False)


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    """The FSDP units of ``model``, root first; empty for a model that is not sharded."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every weight of a sharded ``model`` whole on every process inside the block, with no communication in
    its forward passes; all processes must enter it together. Resharded (memory freed) on exit."""
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # as shard_model left them


def reshard(model: nn.Module) -> None:
    """Free the gathered weights of a sharded ``model`` (its root stays gathered after a forward without
    backward); nothing for a model that is not sharded."""
    for unit in fsdp_units(model):
        unit.reshard()


def full_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The entries of ``model.state_dict()`` one at a time, each sharded tensor gathered whole (a collective:
    every process must go through the whole iterator)."""
    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def save_pretrained(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: Path, *, is_global_zero: bool
) -> None:
    """``model`` and ``tokenizer`` as a Hugging Face model directory, written by the first process; a sharded
    model's weights are gathered on it first (every process must call this)."""
    state = None
    if fsdp_units(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_global_zero:
        model.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)
