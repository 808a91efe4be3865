"""The self-teacher's weights: an exponential moving average of the policy, or the live policy itself."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_teacher(policy: nn.Module) -> nn.Module:
    """A frozen copy of ``policy`` in eval mode, to be tracked with :func:`ema_update`."""
    teacher = copy.deepcopy(policy)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, rate: float) -> None:
    """θ̄ ← (1 - rate)·θ̄ + rate·θ for every parameter; buffers are copied.

    ``rate`` in (0, 1]; 1 makes the teacher a copy of the student.
    """
    if not 0 < rate <= 1:
        raise ValueError(f"method.ema_rate={rate} is invalid: a value in (0, 1] is accepted")
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(f"teacher has {len(teacher_params)} parameters, student {len(student_params)}")
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], rate)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
