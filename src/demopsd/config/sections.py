"""The config sections around the method: data, model, checkpoints, guards, paths and loggers.

As in :mod:`demopsd.config.settings`, field names are the Hydra keys of the section (``SECTION``), the defaults
here are the only ones (conf/ YAML files hold what differs), and each dataclass checks its rules on construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from demopsd.config.settings import DTYPE_NAMES, REWARD_RULES, WANDB_MODES, EvalConfig, broken_rules, check_rules

ON_BAD_ROW = ("error", "skip")
ON_LONG_PROMPT = ("filter", "error")
"""Accepted values of ``data.on_long_prompt``: leave out, or refuse, training prompts over ``data.max_prompt_tokens``
(the first is the default, the reference's ``filter_overlong_prompts: True``)."""


@dataclass(frozen=True)
class DataConfig:
    """``data``: one dataset, read by the loader its ``source`` names (:mod:`demopsd.data.loading`); the subclass
    of each source adds its own keys (:data:`DATA_SOURCES`).

    ``reward``: the rule that scores an answer (the reference's rule for the source by default); ``on_bad_row``:
    ``error`` stops the load naming ``<file>:<line>``, ``skip`` leaves bad rows out, counted and warned about;
    ``batch_size``: prompts per training step (each gets ``rollout.n`` rollouts); ``max_prompt_tokens``: the
    longest training prompt (chat template included), longer ones are left out with a warning giving their
    number (``on_long_prompt=filter``, the reference's ``filter_overlong_prompts``) or stop the run (``error``);
    ``teacher_sees_answer``: the teacher's privileged context falls back to the reference answer.
    """

    SECTION: ClassVar[str] = "data"
    source: str = ""
    name: str = ""
    train_split: str | None = "train"
    test_split: str = "test"
    reward: str = "answer_tag"
    on_bad_row: str = "error"
    batch_size: int = 4
    max_prompt_tokens: int = 768
    on_long_prompt: str = "filter"
    num_workers: int = 0
    teacher_sees_answer: bool = False

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.reward in REWARD_RULES, "reward", self.reward, f"one of {REWARD_RULES} (src/demopsd/data/rewards.py)"),
            (self.on_bad_row in ON_BAD_ROW, "on_bad_row", self.on_bad_row, f"one of {ON_BAD_ROW}"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1 (prompts per training step)"),
            (self.max_prompt_tokens >= 1, "max_prompt_tokens", self.max_prompt_tokens,
             "an integer >= 1 (longer training prompts are left out, or refused: data.on_long_prompt)"),
            (self.on_long_prompt in ON_LONG_PROMPT, "on_long_prompt", self.on_long_prompt, f"one of {ON_LONG_PROMPT}"),
            (self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0"),
            *self.source_rules(),
        )

    def source_rules(self) -> tuple:
        """The rules of the source's own keys, as ``check_rules`` takes them."""
        return ()


@dataclass(frozen=True)
class SciKnowEvalData(DataConfig):
    """SciKnowEval L3 multiple-choice questions of one ``domain`` (``<data_dir>/sciknoweval/<domain>/<split>.json``)."""

    DOMAINS: ClassVar[tuple[str, ...]] = ("biology", "chemistry", "material", "physics")
    source: str = "sciknoweval"
    domain: str = "biology"

    def source_rules(self) -> tuple:
        return ((self.domain in self.DOMAINS, "domain", self.domain, f"one of {self.DOMAINS}"),)


@dataclass(frozen=True)
class GPQAData(DataConfig):
    """GPQA (``<data_dir>/gpqa/gpqa_<subset>.csv``), for evaluation only: ``domains`` keeps those High-level domain
    values (null: all), ``shuffle_seed`` fixes the options' letter order, ``prompt_style`` is the SDPO reference's
    GPQA prompt (``reference``: ``\\boxed{}`` letter, no system prompt) or the SciKnowEval layout (``sciknoweval``)."""

    SUBSETS: ClassVar[tuple[str, ...]] = ("diamond", "main", "extended")
    PROMPT_STYLES: ClassVar[tuple[str, ...]] = ("reference", "sciknoweval")
    source: str = "gpqa"
    train_split: str | None = None
    reward: str = "last_letter"
    subset: str = "diamond"
    domains: list | None = None
    shuffle_seed: int = 0
    prompt_style: str = "reference"

    def source_rules(self) -> tuple:
        return (
            (self.subset in self.SUBSETS, "subset", self.subset, f"one of {self.SUBSETS}"),
            (self.prompt_style in self.PROMPT_STYLES, "prompt_style", self.prompt_style,
             f"one of {self.PROMPT_STYLES}"),
            (self.train_split is None, "train_split", self.train_split, "null (GPQA is for evaluation only)"),
        )


@dataclass(frozen=True)
class SyntheticData(DataConfig):
    """The generated leakage task (:mod:`demopsd.data.synthetic`): ``kind`` inferable, uninferable or mixed
    questions, all fixed by ``generator_seed``; ``train_size`` / ``test_size`` null: 400 / 100 per kind (a mixed set
    counts both kinds). ``held_out``: datasets evaluated separately in place of the test split (mixed: its two kinds,
    each with its own ``test_size`` and ``balanced_letters``)."""

    KINDS: ClassVar[tuple[str, ...]] = ("mixed", "inferable", "uninferable")
    source: str = "synthetic"
    kind: str = "mixed"
    generator_seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    balanced_letters: bool = True
    """The test split's correct letters in shuffled runs of A, B, C, D, so that every first multiple of four of its
    questions has each letter equally often and always answering one letter scores exactly 1/4; false: each drawn
    alone, as the train split's always are."""
    teacher_sees_answer: bool = True
    held_out: dict[str, SyntheticData] = field(default_factory=dict)

    def source_rules(self) -> tuple:
        return (
            (self.kind in self.KINDS, "kind", self.kind, f"one of {self.KINDS}"),
            *((size is None or size >= 1, key, size, "null or an integer >= 1")
              for key, size in (("train_size", self.train_size), ("test_size", self.test_size))),
        )


DATA_SOURCES: dict[str, type[DataConfig]] = {
    "sciknoweval": SciKnowEvalData, "gpqa": GPQAData, "synthetic": SyntheticData,
}
"""The settings class of each ``data.source``."""


@dataclass(frozen=True)
class EvalSettings(EvalConfig):
    """``eval``: how to evaluate (:class:`EvalConfig`), what (the test split of ``data`` when ``in_domain``, and
    every dataset of ``ood``, by name), and when during training: before it (``at_start``, the untrained model's
    baseline at step 0), every ``every_n_steps`` training steps (0: never), after the last step (``at_end``)."""

    every_n_steps: int = 50
    at_start: bool = True
    at_end: bool = True
    in_domain: bool = True
    ood: dict[str, DataConfig] = field(default_factory=dict)
    """More datasets, by name: each a ``data`` section (its own ``source``), e.g. ``eval=gpqa`` adds GPQA-diamond."""

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            *broken_rules(super().__post_init__),
            (self.every_n_steps >= 0, "every_n_steps", self.every_n_steps,
             "0 (never) or a positive number of training steps"),
        )

    @property
    def scheduled(self) -> bool:
        return bool(self.every_n_steps or self.at_start or self.at_end)


@dataclass(frozen=True)
class ModelConfig:
    """``model``: the policy's weights (a Hugging Face id, a local directory, or a model this project builds into
    its cache), their ``dtype`` (the master weights), and extra arguments of its chat template."""

    SECTION: ClassVar[str] = "model"
    name_or_path: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    chat_template_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_rules(self.SECTION, (self.dtype in DTYPE_NAMES, "dtype", self.dtype, f"one of {', '.join(DTYPE_NAMES)}"))


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint``: a checkpoint every ``every_n_train_steps`` training steps and at the end, linked as
    ``last.ckpt`` (0: none, and no resume); the newest ``keep`` stay on disk (-1: all; each holds the policy, the
    EMA teacher and AdamW's state); ``save_final_model`` also writes the final policy as a Hugging Face model."""

    SECTION: ClassVar[str] = "checkpoint"
    every_n_train_steps: int = 50
    keep: int = 1
    save_final_model: bool = True

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.every_n_train_steps >= 0, "every_n_train_steps", self.every_n_train_steps,
             "0 (no checkpoints) or a positive number of training steps"),
            (self.keep >= 1 or self.keep == -1, "keep", self.keep, "a positive number (the newest kept) or -1 (all)"),
        )


@dataclass(frozen=True)
class GuardConfig:
    """``guards`` (:mod:`demopsd.training.guards`): an update with a non-finite loss or gradient is skipped, and
    ``max_consecutive_skips`` in a row stop the run; a warning when ``train/entropy`` or ``train/response_length``
    falls below its ratio × its mean over the first ``warmup_steps`` steps (a ratio of 0 turns it off)."""

    SECTION: ClassVar[str] = "guards"
    max_consecutive_skips: int = 5
    entropy_collapse_ratio: float = 0.2
    length_collapse_ratio: float = 0.2
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.max_consecutive_skips >= 1, "max_consecutive_skips", self.max_consecutive_skips, "an integer >= 1"),
            *((0 <= ratio < 1, key, ratio, "a value in [0, 1)") for key, ratio in (
                ("entropy_collapse_ratio", self.entropy_collapse_ratio),
                ("length_collapse_ratio", self.length_collapse_ratio))),
            (self.warmup_steps >= 1, "warmup_steps", self.warmup_steps, "an integer >= 1"),
        )


@dataclass(frozen=True)
class PathsConfig:
    """``paths``: where the project lives (``root_dir``), its datasets (``data_dir``: holds
    ``sciknoweval/<domain>/<split>.json``; null: none on disk), converted models (``cache_dir``; null:
    ``~/.cache/demopsd``), all runs (``log_dir``) and this run (``output_dir``: Hydra's run directory, null in a
    config composed outside a Hydra app)."""

    SECTION: ClassVar[str] = "paths"
    root_dir: str = "."
    data_dir: str | None = None
    cache_dir: str | None = None
    log_dir: str = "outputs"
    output_dir: str | None = None


@dataclass(frozen=True)
class WandbConfig:
    """``logger.wandb``: a W&B run in ``project`` / ``entity``, in ``group`` (a method's seeds on one dataset), online
    when W&B is logged in and offline otherwise (``mode=auto``)."""

    SECTION: ClassVar[str] = "logger.wandb"
    enabled: bool = True
    mode: str = "auto"
    project: str = "demopsd"
    entity: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list = field(default_factory=list)

    def __post_init__(self) -> None:
        check_rules(self.SECTION, (self.mode in WANDB_MODES, "mode", self.mode, f"one of {WANDB_MODES}"))


@dataclass(frozen=True)
class LoggerConfig:
    """``logger``: ``metrics.csv`` in the run directory always (``csv``), and W&B unless ``wandb.enabled`` is false."""

    SECTION: ClassVar[str] = "logger"
    csv: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
