"""Fully sharded data parallel (FSDP2) for the policy and its EMA teacher, through Lightning.

``trainer=fsdp`` runs :class:`FullyShardedStrategy`: each of the W processes keeps 1/W of every weight,
gradient and optimizer state. :func:`shard_model` makes each decoder layer one unit that is all-gathered
just before its forward (and again in backward) and freed after it; the embeddings, the final norm and the
LM head form the root unit, which stays gathered from the forward until the end of backward, so the
objectives can use the LM-head weight after the forward (:func:`demopsd.rollout.forward.lm_head_weight`).

Generation decodes one token per forward: :func:`gathered` all-gathers every unit once for a whole
``generate`` call (or an evaluation) instead of once per token. A model that is not sharded passes through
every function here unchanged, so the same code runs under ``trainer=default`` and ``trainer=ddp``.

Host memory: under ``trainer=fsdp`` the policy is read by the process of global rank 0 only; every other process
builds it on the meta device (:func:`demopsd.runtime.models.load_model_and_tokenizer` with ``sharded=True``).
:func:`shard_from_rank0` shards the empty model on every process and fills each process's shards from rank 0's
weights, one tensor at a time; the EMA teacher is built empty (:func:`empty_copy`) and filled from the policy's
shards after sharding. At the peak, rank 0 holds one whole copy of the weights plus its shards of the policy and
the teacher, every other process only those shards (2/W of the weights for W processes), where each process
used to hold two whole copies (the loaded policy and its deep-copied teacher).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import get_class
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.settings import ShardingConfig
from demopsd.runtime.models import DTYPES, awaits_rank0_weights, rank0_weights_placed

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


def shards_the_model(trainer: Mapping) -> bool:
    """Whether the trainer config ``trainer`` (``cfg.trainer``) runs a :class:`ModelParallelStrategy`, which hands
    :meth:`demopsd.training.module.SelfDistillationModule.configure_model` a device mesh to shard the policy over
    (``trainer=fsdp``)."""
    strategy = trainer.get("strategy")
    target = strategy.get("_target_") if isinstance(strategy, Mapping) else None
    return target is not None and issubclass(get_class(target), ModelParallelStrategy)


def shard_from_rank0(model: PreTrainedModel, mesh: DeviceMesh, config: ShardingConfig) -> None:
    """Shard ``model`` as :func:`shard_model` does and fill every process's shards with the weights of the process
    of global rank 0, the only one that holds them (``model`` awaits them: :func:`demopsd.runtime.models.
    awaits_rank0_weights`; on the other processes it is on the meta device). A collective: every process calls it.

    Rank 0 sets its loaded tensors aside and empties its model, so that every process shards the same empty model;
    the shards are materialised on the mesh's device and receive rank 0's state dict one whole tensor at a time
    (``set_model_state_dict`` with ``broadcast_from_rank0``); the buffers outside the state dict (the rotary
    ``inv_freq``) are broadcast from rank 0 after it. Rank 0 holds its whole weights plus its shards until this
    returns, every other process its shards and one whole tensor in flight.
    """
    if not awaits_rank0_weights(model):
        raise ValueError(f"{type(model).__name__} was not loaded with sharded=True: shard it with shard_model")
    first = dist.get_rank() == 0
    loaded = [first and not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))]
    dist.broadcast_object_list(loaded, src=0)
    if not loaded[0]:
        raise RuntimeError(
            "the process of global rank 0 holds no weights to shard: it was started with an environment that named "
            "another rank (demopsd.runtime.models.RANK_VARIABLES) when the model was loaded"
        )
    state = model.state_dict()  # on rank 0 the loaded tensors themselves, no copy
    unsaved = {name: buffer for name, buffer in model.named_buffers() if name not in state}
    empty_in_place(model)
    shard_model(model, mesh, config)
    model.to_empty(device=mesh_device(mesh))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state if first else {}, options=options)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in unsaved:
                if first:
                    buffer.copy_(unsaved[name])
                dist.broadcast(buffer, src=0)
    rank0_weights_placed(model)


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """The device of this process's shards on ``mesh``, the one FSDP puts them on: the CPU, or the current
    accelerator of the mesh's type (Lightning sets it to the process's device)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, getattr(torch, mesh.device_type).current_device())


def empty_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer empty on the meta device (no memory; tied parameters
    stay tied, ``requires_grad`` is kept); everything else is deep-copied."""
    return copy.deepcopy(model, memo={id(t): _on_meta(t) for t in itertools.chain(model.parameters(), model.buffers())})


def empty_in_place(model: nn.Module) -> None:
    """Replace every parameter and buffer of ``model`` by an empty one on the meta device, tied parameters by one
    tied parameter (``Module.to("meta")`` unties them: it makes a new parameter in each module that shares one)."""
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id → (original, kept alive: ids stay unique; empty)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    if id(tensor) not in replaced:
                        replaced[id(tensor)] = tensor, _on_meta(tensor)
                    table[name] = replaced[id(tensor)][1]


def _on_meta(tensor: torch.Tensor) -> torch.Tensor:
    empty = torch.empty_like(tensor, device="meta")
    return nn.Parameter(empty, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty


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


@torch.no_grad()
def full_state(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The entries of ``model.state_dict()`` one at a time, each sharded tensor gathered whole (a collective:
    every process must go through the whole iterator); never a whole state dict, one gathered tensor at a time.

    ``dtype``: the floating-point entries are cast to it before they are gathered (a shard where it lies), so the
    gather moves that dtype's bytes and no tensor of the model's own dtype is ever made whole."""
    for name, tensor in model.state_dict().items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
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
