"""Settings of the objectives, validated on construction (field names are the Hydra keys under ``method.objective``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from demopsd.config.settings import check_rules

DISCREPANCIES = ("jsd", "kl_ts", "kl_st", "tv")
BLEND_RULES = ("exp", "linear", "sigmoid", "constant")
AGGREGATIONS = ("seq-mean-token-mean-all", "token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


@dataclass(frozen=True)
class DistillationConfig:
    """Self-distillation (DemoPSD; SDPO and OPSD are ``blend="constant"``, ``lambda_max=1``).

    ``temperature`` τ defaults to 0.1: the JSD discrepancy lies in [0, ln 2], so ``exp(-D/τ)`` keeps
    the teacher (λ ≈ 1) where it barely moves (D ≲ 0.01) and falls to λ ≈ 0.001 at the maximum.
    """

    SECTION: ClassVar[str] = "method.objective"
    top_k: int | None = 100
    tail_bucket: bool = True
    alpha: float = 0.5
    discrepancy: str = "jsd"
    blend: str = "exp"
    lambda_max: float = 1.0
    temperature: float = 0.1
    sigmoid_center: float = 0.1
    normalize_discrepancy: bool = False
    normalize_momentum: float = 0.9
    lambda_warmup_steps: int = 0
    lambda_decay_steps: int = 0
    lambda_final: float | None = None
    is_clip: float | None = 2.0
    aggregation: str = "seq-mean-token-mean-all"

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.top_k is None or (isinstance(self.top_k, int) and self.top_k > 0),
             "top_k", self.top_k, "a positive integer, or null for the full vocabulary,"),
            (0 <= self.alpha <= 1, "alpha", self.alpha, "a value in [0, 1]"),
            (self.discrepancy in DISCREPANCIES, "discrepancy", self.discrepancy, f"one of {DISCREPANCIES}"),
            (self.blend in BLEND_RULES, "blend", self.blend, f"one of {BLEND_RULES}"),
            (0 <= self.lambda_max <= 1, "lambda_max", self.lambda_max, "a value in [0, 1]"),
            (self.lambda_final is None or 0 <= self.lambda_final <= 1,
             "lambda_final", self.lambda_final, "null or a value in [0, 1]"),
            (self.temperature > 0, "temperature", self.temperature, "a positive value"),
            (0 < self.normalize_momentum < 1, "normalize_momentum", self.normalize_momentum, "a value in (0, 1)"),
            (self.lambda_warmup_steps >= 0, "lambda_warmup_steps", self.lambda_warmup_steps, "an integer >= 0"),
            (self.lambda_decay_steps >= 0, "lambda_decay_steps", self.lambda_decay_steps, "an integer >= 0"),
            (self.is_clip is None or self.is_clip >= 1, "is_clip", self.is_clip, "null (off) or a value >= 1"),
            (self.aggregation in AGGREGATIONS, "aggregation", self.aggregation, f"one of {AGGREGATIONS}"),
        )

    @property
    def target_is_teacher(self) -> bool:
        """λ ≡ 1: the target is the teacher itself (SDPO, OPSD)."""
        return self.blend == "constant" and self.lambda_max == 1.0 and self.lambda_warmup_steps == 0 \
            and self.lambda_decay_steps == 0


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO as the SDPO reference's ``baseline_grpo.yaml``: group-centred advantages (``scale_by_std`` divides
    by the group's std too), the PPO ratio clipped to ``[1 - clip_low, 1 + clip_high]``, dual clip
    ``clip_ratio_c`` on negative advantages (null: off), and a per-token importance weight against the
    sampler, truncated at ``rollout_is_threshold`` (null: off; 1 whenever the trainer itself sampled)."""

    SECTION: ClassVar[str] = "method.objective"
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_ratio_c: float | None = 3.0
    scale_by_std: bool = False
    rollout_is_threshold: float | None = 2.0
    aggregation: str = "seq-mean-token-mean-all"

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (0 <= self.clip_low < 1, "clip_low", self.clip_low, "a value in [0, 1)"),
            (self.clip_high >= 0, "clip_high", self.clip_high, "a value >= 0"),
            (self.clip_ratio_c is None or self.clip_ratio_c > 1, "clip_ratio_c", self.clip_ratio_c,
             "null (off) or a value > 1"),
            (self.rollout_is_threshold is None or self.rollout_is_threshold > 0, "rollout_is_threshold",
             self.rollout_is_threshold, "null (off) or a positive value"),
            (self.aggregation in AGGREGATIONS, "aggregation", self.aggregation, f"one of {AGGREGATIONS}"),
        )
