"""The DemoPSD target: the reverse-KL barycenter of teacher and student."""

from __future__ import annotations

import torch


def barycenter_log_probs(
    teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, weight: torch.Tensor | float
) -> torch.Tensor:
    """``log q = λ log p_T + (1-λ) log p_S - log Z`` over the last dimension, ``[..., K]`` → ``[..., K]``.

    ``q`` is the unique minimiser of ``λ KL(q ‖ p_T) + (1-λ) KL(q ‖ p_S)``. ``weight`` (λ) is a float or
    a ``[...]`` tensor, one λ per position. Pass detached inputs for a target without gradient.
    """
    weight = torch.as_tensor(weight, dtype=teacher_log_probs.dtype, device=teacher_log_probs.device)
    if weight.dim():
        weight = weight.unsqueeze(-1)
    mixed = weight * teacher_log_probs + (1 - weight) * student_log_probs
    return mixed.log_softmax(-1)
