"""Masks, loss aggregation and SDPO's clipped importance weight."""

from __future__ import annotations

import torch

from demopsd.config.objectives import AGGREGATIONS


def aggregation_weights(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights ``[B, T]`` so that the aggregated loss is ``Σ w_t ℓ_t``; zero where ``mask`` is 0.

    ``seq-mean-token-mean-all``: 1 / (that sequence's tokens · all sequences of the batch), so a sequence
    without a masked token counts as a zero: the weighting the SDPO reference's training loop gives (micro-batches
    of one sequence, each its token-mean, scaled by 1 / gradient accumulation). ``token-mean``: 1 / (masked
    tokens in the batch). ``seq-mean-token-sum``: 1 / (sequences with a
    masked token). ``seq-mean-token-mean``: 1 / (that sequence's tokens · sequences with a token).
    An all-zero mask gives all-zero weights.
    """
    mask = mask if mask.is_floating_point() else mask.float()
    if mode == "token-mean":
        return mask / mask.sum().clamp(min=1.0)
    lengths = mask.sum(-1, keepdim=True)
    if mode == "seq-mean-token-mean-all":
        return mask / lengths.clamp(min=1.0) / max(mask.shape[0], 1)
    sequences = (lengths > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return mask / sequences
    if mode == "seq-mean-token-mean":
        return mask / lengths.clamp(min=1.0) / sequences
    raise ValueError(f"aggregation={mode!r} is invalid: one of {AGGREGATIONS} is accepted")


def importance_weight(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor | None, is_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPO's ``min(exp(clamp(log π_θ - log π_old, -20, 20)), is_clip)``, detached; returns ``(weight, clipped)``.

    ``old_log_probs=None`` is the on-policy case (ratio 1); ``is_clip=None`` turns the weight off (all 1).
    """
    log_probs = log_probs.detach()
    if is_clip is None:
        return torch.ones_like(log_probs), torch.zeros_like(log_probs, dtype=torch.bool)
    if is_clip < 1:
        raise ValueError(f"is_clip={is_clip!r} is invalid: null (off) or a value >= 1 is accepted")
    old = log_probs if old_log_probs is None else old_log_probs.detach()
    ratio = torch.exp((log_probs - old).clamp(-20.0, 20.0))
    return ratio.clamp(max=is_clip), ratio > is_clip
