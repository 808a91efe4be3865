"""Divergences between distributions given as log-probs over the last dimension."""

from __future__ import annotations

import math

import torch


def kl(p_log_probs: torch.Tensor, q_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` per position: ``[..., V]`` → ``[...]``."""
    return (p_log_probs.exp() * (p_log_probs - q_log_probs)).sum(-1)


def divergence(student_log_probs: torch.Tensor, target_log_probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """SDPO's divergence family per position, ``[..., V]`` → ``[...]``.

    ``alpha = 0``: forward ``KL(q ‖ p_S)``; ``alpha = 1``: reverse ``KL(p_S ‖ q)``; otherwise the
    generalised JSD with mixture ``m = (1-α) p_S + α q``: ``α KL(q ‖ m) + (1-α) KL(p_S ‖ m)``,
    which tends to ``α KL(q ‖ p_S)`` as α → 0 and to ``(1-α) KL(p_S ‖ q)`` as α → 1.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} is invalid: a value in [0, 1] is accepted")
    if alpha == 0:
        return kl(target_log_probs, student_log_probs)
    if alpha == 1:
        return kl(student_log_probs, target_log_probs)
    mixture = torch.logaddexp(student_log_probs + math.log1p(-alpha), target_log_probs + math.log(alpha))
    return alpha * kl(target_log_probs, mixture) + (1 - alpha) * kl(student_log_probs, mixture)
