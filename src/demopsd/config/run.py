"""The typed settings of a whole run, built once from the composed config by
:func:`demopsd.config.check.validate_config`, which also owns the rules across sections.

Each field is the config key of the same name; what no dataclass types is Lightning's own: ``trainer`` and
``callbacks`` are instantiation specs handed to Hydra as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from demopsd.config.batching import MemoryConfig
from demopsd.config.methods import DistillMethodConfig, MethodConfig
from demopsd.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalSettings,
    GuardConfig,
    LoggerConfig,
    ModelConfig,
    PathsConfig,
    SciKnowEvalData,
)
from demopsd.config.settings import OptimConfig, PromptConfig, RolloutConfig, ShardingConfig, check_rules

EVAL_DEVICES = ("auto", "cpu", "cuda")
"""Values of ``python src/eval.py``'s ``device`` key."""


@dataclass(frozen=True)
class RunSettings:
    """What both entry points read: ``run_name`` labels the run's directory, ``ckpt_path`` names a checkpoint (a
    ``.ckpt``, a run directory; ``last`` for training), the data, model, rollout, evaluation and paths sections.
    ``resolved`` is the whole composed config with its interpolations resolved, as saved beside the run."""

    SECTION: ClassVar[str] = ""
    seed: int = 0
    task_name: str = ""
    run_name: str = ""
    ckpt_path: str | None = None
    data: DataConfig = field(default_factory=SciKnowEvalData)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    paths: PathsConfig = field(default_factory=PathsConfig)
    resolved: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class TrainSettings(RunSettings):
    """``python src/train.py``'s config, typed: a :class:`RunSettings` with the method, its optimizer and memory,
    sharding, checkpoints, guards and loggers; ``ckpt_path`` resumes a run; ``optimized_metric`` names the metric
    ``main()`` returns to Hydra's sweepers."""

    task_name: str = "train"
    optimized_metric: str | None = None
    method: MethodConfig = field(default_factory=DistillMethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    fsdp: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: dict = field(default_factory=dict)
    callbacks: dict = field(default_factory=dict)

    @property
    def prompts(self) -> PromptConfig:
        """How examples become the student's prompts: ``data.max_prompt_tokens``, ``model.chat_template_kwargs``."""
        return PromptConfig(self.data.max_prompt_tokens, self.model.chat_template_kwargs)

    @property
    def max_model_len(self) -> int:
        """The longest sequence a rollout can be: the prompt limit plus the response budget."""
        return self.data.max_prompt_tokens + self.rollout.max_new_tokens

    @property
    def updates_per_batch(self) -> int:
        """Optimizer updates per training step: ``data.batch_size / method.mini_batch_size`` (1 without a
        mini-batch or with one of at least the whole batch)."""
        mini = self.method.mini_batch_size
        return 1 if mini is None or mini >= self.data.batch_size else self.data.batch_size // mini


@dataclass(frozen=True)
class EvalRunSettings(RunSettings):
    """``python src/eval.py``'s config, typed: the policy ``ckpt_path`` names (null: the base ``model``), evaluated
    on ``device`` (``auto``: CUDA where torch has it, else the CPU) as ``eval`` says."""

    task_name: str = "eval"
    device: str = "auto"

    def __post_init__(self) -> None:
        check_rules(self.SECTION, (self.device in EVAL_DEVICES, "device", self.device, f"one of {EVAL_DEVICES}"))
