"""How much of the teacher to adopt per token: the discrepancy ``D_t``, the rule ``λ_t = λ_max·m(D_t)``,
the λ_max schedule and the optional EMA normalisation of ``D``."""

from __future__ import annotations

import torch

from demopsd.config.objectives import BLEND_RULES, DISCREPANCIES, DistillationConfig
from demopsd.objectives.divergence import divergence, kl


def discrepancy(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """``D_t`` between ``p_T`` and ``p_S`` on a shared support, ``[..., K]`` → ``[...]``.

    ``jsd`` (in [0, ln 2]), ``kl_ts = KL(p_T ‖ p_S)``, ``kl_st = KL(p_S ‖ p_T)``, ``tv`` (in [0, 1]).
    """
    if kind == "jsd":
        return divergence(student_log_probs, teacher_log_probs, 0.5)
    if kind == "kl_ts":
        return kl(teacher_log_probs, student_log_probs)
    if kind == "kl_st":
        return kl(student_log_probs, teacher_log_probs)
    if kind == "tv":
        return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)
    raise ValueError(f"discrepancy={kind!r} is invalid: one of {DISCREPANCIES} is accepted")


def blend_weight(
    discrepancy_values: torch.Tensor, rule: str, lambda_max: float, temperature: float, sigmoid_center: float = 0.0
) -> torch.Tensor:
    """``λ = λ_max · m(D)`` with a non-increasing ``m``: ``exp(-D/τ)``, ``clip(1 - D/τ, 0, 1)``,
    ``σ((center - D)/τ)`` or ``1``."""
    d = discrepancy_values
    if rule == "exp":
        m = torch.exp(-d / temperature)
    elif rule == "linear":
        m = (1 - d / temperature).clamp(0.0, 1.0)
    elif rule == "sigmoid":
        m = torch.sigmoid((sigmoid_center - d) / temperature)
    elif rule == "constant":
        m = torch.ones_like(d)
    else:
        raise ValueError(f"blend={rule!r} is invalid: one of {BLEND_RULES} is accepted")
    return lambda_max * m


def lambda_max_at(config: DistillationConfig, step: int) -> float:
    """λ_max at training step ``step``: linear warm-up from 0 over ``lambda_warmup_steps``, then a linear
    decay to ``lambda_final`` over ``lambda_decay_steps`` (when both are set), then constant."""
    peak, warmup = config.lambda_max, config.lambda_warmup_steps
    if step < warmup:
        return peak * step / warmup
    if config.lambda_final is None or config.lambda_decay_steps == 0:
        return peak
    progress = min(1.0, (step - warmup) / config.lambda_decay_steps)
    return peak + (config.lambda_final - peak) * progress


class DiscrepancyNormalizer:
    """EMA of the batch-mean discrepancy; ``D / scale`` makes the blend temperature relative to typical D."""

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0 < momentum < 1:
            raise ValueError(f"normalize_momentum={momentum!r} is invalid: a value in (0, 1) is accepted")
        self.momentum = momentum
        self.scale: float | None = None

    def update(self, batch_mean: float) -> None:
        if self.scale is None:
            self.scale = float(batch_mean)
        else:
            self.scale = self.momentum * self.scale + (1 - self.momentum) * float(batch_mean)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.scale = state["momentum"], state["scale"]
