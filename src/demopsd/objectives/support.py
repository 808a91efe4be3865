"""The distribution support: the student's top-k tokens and an optional tail bucket (as the SDPO reference)."""

from __future__ import annotations

import torch

TAIL_LOG_MASS_MAX = -1e-7
"""The top-k log-mass is clamped below this before ``log(1 - mass)``, as in the SDPO reference: a top-k
holding all the mass (to rounding) leaves a tail of ``1e-7`` instead of ``log 0``."""


def add_tail_bucket(topk_log_probs: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` top-k log-probs → ``[..., K+1]``, the last entry ``log(1 - Σ exp)``.

    Computed as ``log(-expm1(min(logsumexp(topk), -1e-7)))``, the reference's formula: finite wherever the
    top-k log-probs are, with the reference's values everywhere.
    """
    log_mass = torch.logsumexp(topk_log_probs, dim=-1, keepdim=True).clamp(max=TAIL_LOG_MASS_MAX)
    return torch.cat([topk_log_probs, torch.log(-torch.expm1(log_mass))], dim=-1)


def support_log_probs(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    top_k: int | None,
    tail_bucket: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary ``[N, V]`` log-probs → both on the student's top-k support ``[N, K(+1)]``.

    The token choice carries no gradient. Without a tail bucket both are renormalised on the top-k.
    ``top_k=None`` (or ``>= V``) keeps the full vocabulary. No floor is put under the log-probs: from finite
    logits every value is finite, and the divergences are then the reference's to rounding.
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
    return student_log_probs, teacher_log_probs
