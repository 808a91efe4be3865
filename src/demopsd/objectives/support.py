"""The distribution support: the student's top-k tokens, an optional tail bucket, clamped log-probs."""

from __future__ import annotations

import math

import torch


def add_tail_bucket(topk_log_probs: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` top-k log-probs → ``[..., K+1]``, the last entry ``log(1 - Σ exp)``.

    Computed as ``log(-expm1(logsumexp(topk)))``. When the top-k mass rounds to exactly 1 the tail mass
    is floored at the smallest normal number of the dtype (about ``-87`` for float32, which
    :func:`clamp_log_probs` floors further), so that neither the value nor the gradient is infinite.
    """
    mass = torch.logsumexp(topk_log_probs, dim=-1, keepdim=True).clamp(max=0.0)
    tail = torch.log((-torch.expm1(mass)).clamp(min=torch.finfo(mass.dtype).tiny))
    return torch.cat([topk_log_probs, tail], dim=-1)


def clamp_log_probs(log_probs: torch.Tensor, eps: float) -> torch.Tensor:
    """Floor log-probabilities at ``log(eps)`` so that no term of a divergence is infinite."""
    return log_probs.clamp(min=math.log(eps))


def support_log_probs(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    top_k: int | None,
    tail_bucket: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary ``[N, V]`` log-probs → both on the student's top-k support ``[N, K(+1)]``.

    The token choice carries no gradient. Without a tail bucket both are renormalised on the top-k.
    ``top_k=None`` (or ``>= V``) keeps the full vocabulary.
    """
    if top_k is not None and top_k < student_log_probs.shape[-1]:
        index = student_log_probs.detach().topk(top_k, dim=-1).indices
        student_log_probs = student_log_probs.gather(-1, index)
        teacher_log_probs = teacher_log_probs.gather(-1, index)
        if tail_bucket:
            student_log_probs, teacher_log_probs = add_tail_bucket(student_log_probs), add_tail_bucket(teacher_log_probs)
        else:
            student_log_probs = student_log_probs.log_softmax(-1)
            teacher_log_probs = teacher_log_probs.log_softmax(-1)
    return clamp_log_probs(student_log_probs, eps), clamp_log_probs(teacher_log_probs, eps)
