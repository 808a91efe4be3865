"""GRPO: group-centred advantages and the dual-clipped PPO surrogate with a truncated sampler correction."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
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


LOG_RATIO_BOUND = 20.0
"""Log importance ratios are clamped to ``±20`` before ``exp``, as in the reference."""


def truncated_sampler_weight(
    log_probs: torch.Tensor, sampler_log_probs: torch.Tensor | None, threshold: float | None
) -> torch.Tensor:
    """Per-token ``min(exp(clamp(log π_θ - log π_sampler, ±20)), threshold)`` ``[N]``, detached.

    The reference's token-level truncated importance sampling against the engine that sampled the rollouts
    (``rollout_correction.rollout_is: token``); all ones when the trainer sampled (``sampler_log_probs=None``)
    or ``threshold=None``.
    """
    if sampler_log_probs is None or threshold is None:
        return torch.ones_like(log_probs.detach())
    log_ratio = (log_probs.detach() - sampler_log_probs.detach()).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return log_ratio.exp().clamp(max=threshold)


def grpo_loss(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    old_log_probs: torch.Tensor | None = None,
    sampler_log_probs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = 3.0,
    rollout_is_threshold: float | None = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_t w_t · is_t · ℓ_t`` over tokens ``[N]``, the reference's dual-clip PPO loss.

    ``r_t = exp(clamp(log π_θ - log π_old, ±20))`` with ``log π_old`` the trainer's values when the rollouts were
    scored (``None``: the detached current values, one update per batch, so ``r = 1`` with gradient
    ``∇ log π_θ``); ``ℓ_t = max(-r_t A_t, -clip(r_t, 1-clip_low, 1+clip_high) A_t)``, capped at ``-c·A_t`` where
    ``A_t < 0`` (dual clip, ``c = clip_ratio_c``); ``is_t`` = :func:`truncated_sampler_weight`.

    Metrics over the tokens with a weight, as the reference counts them: ``clip_fraction``, where the clipped
    ratio raised the loss (the clip acted); ``clip_fraction_lower``, where the dual clip capped it.
    """
    old = log_probs.detach() if old_log_probs is None else old_log_probs
    ratio = torch.exp((log_probs - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(per_token, dtype=torch.bool)
    if clip_ratio_c is not None:
        dual_clipped = (advantages < 0) & (per_token > -advantages * clip_ratio_c)
        per_token = torch.where(dual_clipped, -advantages * clip_ratio_c, per_token)
    sampler_weight = truncated_sampler_weight(old, sampler_log_probs, rollout_is_threshold)
    loss = (token_weights * sampler_weight * per_token).sum()
    counted = token_weights > 0
    metrics = {
        "loss": loss.detach(),
        "clip_fraction": (clipped > unclipped).to(per_token.dtype)[counted].mean(),
        "clip_fraction_lower": dual_clipped.to(per_token.dtype)[counted].mean(),
        "ratio_mean": ratio.detach()[counted].mean(),
        "sampler_weight_mean": sampler_weight[counted].mean(),
    }
    return loss, metrics
