"""The self-distillation loss (DemoPSD, SDPO, OPSD), from logits or, memory-lean, from hidden states.

Per response token ``t``: student top-k support (+ tail bucket), discrepancy ``D_t`` between teacher and
the detached student, ``λ_t = λ_max·m(D_t / scale)``, target ``q_t`` = barycenter (the teacher itself
when λ ≡ 1), ``ℓ_t = divergence(p_S,t, q_t, α)``, times SDPO's clipped importance weight; the loss is
``Σ_t w_t · is_t · ℓ_t`` with ``w`` from :func:`~demopsd.objectives.aggregation.aggregation_weights`.
"""

from __future__ import annotations

import torch

from demopsd.config.objectives import DistillationConfig
from demopsd.objectives.aggregation import importance_weight
from demopsd.objectives.blend import blend_weight, discrepancy
from demopsd.objectives.divergence import divergence, kl
from demopsd.objectives.support import support_log_probs
from demopsd.objectives.target import barycenter_log_probs

TOKEN_STATS = (
    "lambda", "discrepancy", "kl_teacher_student", "kl_target_student", "kl_teacher_student_full", "entropy",
    "is_weight", "is_clipped",
)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits → float32 for the softmax; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    config: DistillationConfig,
    *,
    old_log_probs: torch.Tensor | None = None,
    lambda_max: float | None = None,
    discrepancy_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-weighted per-token losses ``[N]`` (with gradient to ``student_logits`` ``[N, V]``) and
    detached per-token statistics ``[N]`` named in :data:`TOKEN_STATS`.

    ``kl_teacher_student`` (``KL(p_T ‖ p_S)``) and ``kl_target_student`` (``KL(q ‖ p_S)``) are on the objective's
    support, so their ratio is exactly 1 where the target is the teacher; ``kl_teacher_student_full`` is
    ``KL(p_T ‖ p_S)`` on the full vocabulary; ``entropy`` is the student's full-vocabulary entropy.
    """
    lambda_max = config.lambda_max if lambda_max is None else lambda_max
    student_full = upcast(student_logits).log_softmax(-1)
    with torch.no_grad():
        teacher_full = upcast(teacher_logits.detach()).log_softmax(-1)
        detached_full = student_full.detach()
        entropy = -(detached_full.exp() * detached_full).sum(-1)
        kl_teacher_student_full = kl(teacher_full, detached_full)

    student, teacher = support_log_probs(student_full, teacher_full, config.top_k, config.tail_bucket)
    with torch.no_grad():
        sg_student = student.detach()
        d = discrepancy(teacher, sg_student, config.discrepancy)
        scaled = d if discrepancy_scale is None else d / max(discrepancy_scale, 1e-12)
        lam = blend_weight(scaled, config.blend, lambda_max, config.temperature, config.sigmoid_center)
        if config.target_is_teacher and lambda_max == 1.0:
            target = teacher
        else:
            target = barycenter_log_probs(teacher, sg_student, lam)
        kl_target_student = kl(target, sg_student)
        kl_teacher_student = kl(teacher, sg_student)

    token_log_probs = student_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    weight, clipped = importance_weight(token_log_probs, old_log_probs, config.is_clip)
    losses = divergence(student, target, config.alpha) * weight
    stats = dict(zip(TOKEN_STATS, (
        lam, d, kl_teacher_student, kl_target_student, kl_teacher_student_full, entropy, weight, clipped,
    )))
    return losses, stats


def summarize(loss: torch.Tensor, stats: dict[str, torch.Tensor], token_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """0-dim metrics: distillation statistics over tokens with weight > 0, entropy over all tokens.

    Means over an empty set of distilled tokens are NaN (nothing was distilled, so nothing to report).
    """
    distilled = token_weights > 0
    lam = stats["lambda"][distilled]
    quantiles = torch.quantile(lam, torch.tensor([0.1, 0.5, 0.9], dtype=lam.dtype)) if lam.numel() else torch.full((3,), float("nan"))
    metrics = {
        "loss": loss.detach(),
        "lambda_mean": lam.mean(),
        "lambda_q10": quantiles[0],
        "lambda_q50": quantiles[1],
        "lambda_q90": quantiles[2],
        "discrepancy_mean": stats["discrepancy"][distilled].mean(),
        "kl_teacher_student": stats["kl_teacher_student"][distilled].mean(),
        "kl_target_student": stats["kl_target_student"][distilled].mean(),
        "kl_teacher_student_full": stats["kl_teacher_student_full"][distilled].mean(),
        "entropy": stats["entropy"].mean(),
        "is_weight_mean": stats["is_weight"][distilled].mean(),
        "is_clip_fraction": stats["is_clipped"][distilled].float().mean(),
    }
    return metrics


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    token_weights: torch.Tensor,
    config: DistillationConfig,
    *,
    old_log_probs: torch.Tensor | None = None,
    lambda_max: float | None = None,
    discrepancy_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The straightforward path: ``[N, V]`` logits of student (with grad) and teacher → ``(loss, metrics)``.

    ``tokens`` ``[N]`` are the sampled response tokens, ``token_weights`` ``[N]`` the aggregation
    weights (zero for tokens that are not distilled).
    """
    losses, stats = token_losses(
        student_logits, teacher_logits, tokens, config,
        old_log_probs=old_log_probs, lambda_max=lambda_max, discrepancy_scale=discrepancy_scale,
    )
    loss = (token_weights * losses).sum()
    return loss, summarize(loss, stats, token_weights)
