"""The objectives of on-policy self-distillation and GRPO, in pure torch (no Lightning, no Hydra).

Each method is a configuration of this one library: DemoPSD is a
:class:`~demopsd.config.objectives.DistillationConfig` with a blend rule; SDPO and OPSD are
``blend="constant", lambda_max=1`` (the target is the teacher); GRPO is a
:class:`~demopsd.config.objectives.GRPOConfig` with :func:`grpo_loss`.

May import: ``config`` (the objectives' settings).
"""

from demopsd.objectives.aggregation import aggregation_weights, importance_weight
from demopsd.objectives.blend import DiscrepancyNormalizer, blend_weight, discrepancy, lambda_max_at
from demopsd.objectives.chunked import chunked_distillation, chunked_distillation_loss, chunked_token_log_probs
from demopsd.objectives.distill import distillation_loss, summarize, token_losses
from demopsd.objectives.divergence import divergence, kl
from demopsd.objectives.grpo import grpo_advantages, grpo_loss, truncated_sampler_weight
from demopsd.objectives.support import add_tail_bucket, support_log_probs
from demopsd.objectives.target import barycenter_log_probs

__all__ = [
    "DiscrepancyNormalizer", "add_tail_bucket", "aggregation_weights", "barycenter_log_probs", "blend_weight", "chunked_distillation",
    "chunked_distillation_loss",
    "chunked_token_log_probs", "discrepancy", "distillation_loss", "divergence",
    "grpo_advantages", "grpo_loss", "importance_weight", "kl", "lambda_max_at", "summarize", "support_log_probs",
    "token_losses", "truncated_sampler_weight",
]
