"""GRPO: group-normalised advantages and the PPO-clipped surrogate, optionally with a KL to a reference."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``[B]`` rewards in consecutive groups of ``group_size`` → ``(r - mean_group) [/ (std_group + eps)]``.

    The standard deviation is the unbiased one (a group of identical rewards gets advantage 0).
    """
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size={group_size!r} is invalid for {rewards.numel()} rewards: a divisor of the count is accepted"
        )
    groups = (rewards if rewards.is_floating_point() else rewards.float()).view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.view(-1)


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_log_probs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_t w_t · (-min(r_t A_t, clip(r_t, 1-clip_low, 1+clip_high) A_t) + β·k3_t)`` over tokens ``[N]``.

    ``r_t = exp(log π_θ - log π_old)`` (``old_log_probs=None``: on-policy, the detached current values);
    ``k3_t = exp(ref - log π_θ) - (ref - log π_θ) - 1``, the non-negative KL estimator to a reference.
    """
    old = log_probs.detach() if old_log_probs is None else old_log_probs
    ratio = torch.exp(log_probs - old)
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    metrics = {
        "clip_fraction": ((ratio - clipped_ratio).abs() > 0).float()[token_weights > 0].mean(),
        "ratio_mean": ratio.detach()[token_weights > 0].mean(),
    }
    if ref_log_probs is not None and kl_coef > 0:
        delta = ref_log_probs - log_probs
        k3 = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * k3
        metrics["kl_ref"] = k3.detach()[token_weights > 0].mean()
    loss = (token_weights * per_token).sum()
    metrics["loss"] = loss.detach()
    return loss, metrics
