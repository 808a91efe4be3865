"""The self-teacher's weights: an exponential moving average of the policy, or the live policy itself.

Under ``trainer=fsdp`` the EMA teacher never exists whole: it is built empty beside a policy that awaits rank 0's
weights, sharded like it, and filled from the policy's shards (:func:`fill_ema_teacher`), each process copying
its own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from demopsd.runtime.models import awaits_rank0_weights
from demopsd.runtime.sharding import empty_copy


def make_ema_teacher(policy: nn.Module) -> nn.Module:
    """A frozen copy of ``policy`` in eval mode, to be tracked with :func:`ema_update`.

    A policy that awaits global rank 0's weights (``trainer=fsdp``: :func:`demopsd.runtime.models.
    awaits_rank0_weights`) gets an empty copy, its weights on the meta device: once both are sharded,
    :func:`fill_ema_teacher` gives it the policy's, so no process holds a second whole copy of the weights.
    """
    teacher = empty_copy(policy) if awaits_rank0_weights(policy) else copy.deepcopy(policy)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def fill_ema_teacher(teacher: nn.Module, policy: nn.Module) -> None:
    """Materialise ``teacher``, built empty by :func:`make_ema_teacher` and sharded like ``policy``, on the
    policy's device and copy the policy's parameters and buffers into it: each process copies its own shards, with
    no communication."""
    teacher.to_empty(device=next(policy.parameters()).device)
    teacher_tensors = [*teacher.parameters(), *teacher.buffers()]
    policy_tensors = [*policy.parameters(), *policy.buffers()]
    if len(teacher_tensors) != len(policy_tensors):
        raise ValueError(f"teacher has {len(teacher_tensors)} parameters and buffers, policy {len(policy_tensors)}")
    for t, p in zip(teacher_tensors, policy_tensors):
        t.copy_(p)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, rate: float) -> None:
    """θ̄ ← (1 - rate)·θ̄ + rate·θ for every parameter; buffers are copied.

    ``rate`` in (0, 1] (``method.ema_rate``, checked with the config); 1 makes the teacher a copy of the student.
    """
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(f"teacher has {len(teacher_params)} parameters, student {len(student_params)}")
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], rate)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
