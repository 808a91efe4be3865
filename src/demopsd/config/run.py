"""The typed settings of a training run, built once from the composed config by
:func:`demopsd.config.check.validate_config`, which owns every rule across sections."""

from __future__ import annotations

from dataclasses import dataclass

from demopsd.config.batching import MemoryConfig
from demopsd.config.objectives import DistillationConfig, GRPOConfig
from demopsd.config.settings import (
    EngineConfig,
    EvalConfig,
    OptimConfig,
    PromptConfig,
    RepromptConfig,
    SamplingConfig,
    ShardingConfig,
)


@dataclass(frozen=True)
class MethodSettings:
    """``method``: its ``name`` and objective; for a distillation objective also how the teacher's contexts are
    built (``reprompt``), which teacher (``"ema"``: a moving average moved ``ema_rate`` per step; ``"live"``).
    ``updates_per_batch``: optimizer updates per training step, each on an equal share of the step's prompts
    (``data.batch_size / method.mini_batch_size``; 1 when the mini-batch is the whole batch)."""

    name: str
    objective: DistillationConfig | GRPOConfig
    reprompt: RepromptConfig | None = None
    teacher: str = "ema"
    ema_rate: float = 0.05
    updates_per_batch: int = 1

    @property
    def distills(self) -> bool:
        return isinstance(self.objective, DistillationConfig)


@dataclass(frozen=True)
class EvalSettings:
    """``eval``: how to evaluate (``config``) and when: before training (``at_start``), every ``every_n_steps``
    training steps (0: never), after the last one (``at_end``)."""

    config: EvalConfig
    every_n_steps: int = 0
    at_start: bool = False
    at_end: bool = True

    @property
    def scheduled(self) -> bool:
        return bool(self.every_n_steps or self.at_start or self.at_end)


@dataclass(frozen=True)
class TrainSettings:
    """Everything the training step is built from; ``backend`` names the rollout engine (``engine`` sizes vLLM's)."""

    seed: int
    method: MethodSettings
    sampling: SamplingConfig
    backend: str
    engine: EngineConfig
    optim: OptimConfig
    prompts: PromptConfig
    sharding: ShardingConfig
    evaluation: EvalSettings
    memory: MemoryConfig = MemoryConfig()

    @property
    def max_model_len(self) -> int:
        """The longest sequence a rollout can be: the prompt limit plus the response budget."""
        return self.prompts.max_prompt_tokens + self.sampling.max_new_tokens
