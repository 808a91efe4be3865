"""Run settings that need no torch: read and checked before anything heavy is imported.

Field names are the Hydra keys of their config section (``rollout``, ``optim``); each dataclass checks its
values on construction and names the key, the value and what is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METHOD_KINDS = ("distill", "grpo")
TEACHER_KINDS = ("ema", "live")
ROLLOUT_BACKENDS = ("hf", "vllm")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # of model.dtype and the fsdp dtypes
REWARD_RULES = ("answer_tag", "last_letter", "strict")
"""Accepted values of ``data.reward`` (see :mod:`demopsd.data.rewards`)."""


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample: ``n`` rollouts per prompt, at this temperature / top-p, up to ``max_new_tokens``."""

    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"rollout.n={self.n} is invalid: at least 1 rollout per prompt is accepted")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature={self.temperature} is invalid: a positive temperature is accepted")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p} is invalid: a value in (0, 1] is accepted")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens} is invalid: at least 1 is accepted")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear learning-rate warm-up over ``warmup_steps`` optimizer steps."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} is invalid: a positive learning rate is accepted")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} is invalid: a value >= 0 is accepted")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} is invalid: two numbers in [0, 1) are accepted")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} is invalid: an integer >= 0 is accepted")


@dataclass(frozen=True)
class PromptConfig:
    """How examples become chat prompts: length limit and extra chat-template arguments."""

    max_prompt_tokens: int | None = None
    chat_template_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's share of the machine: ``gpu_memory_utilization`` is the fraction of GPU memory it reserves
    for weights and KV cache (of RAM on vLLM's CPU backend), unless ``kv_cache_memory_bytes`` sizes the KV
    cache directly; ``tensor_parallel_size`` GPUs hold one copy of the model."""

    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = True  # no CUDA-graph / torch.compile warm-up at start

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"rollout.gpu_memory_utilization={self.gpu_memory_utilization} is invalid: a fraction in (0, 1] "
                "is accepted"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(
                f"rollout.kv_cache_memory_bytes={self.kv_cache_memory_bytes} is invalid: null or a positive number "
                "of bytes is accepted"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={self.tensor_parallel_size} is invalid: at least 1 is accepted"
            )


@dataclass(frozen=True)
class ShardingConfig:
    """Fully sharded data parallel (``trainer=fsdp``, the ``fsdp`` config section): weights are all-gathered
    in ``param_dtype`` for forward and backward, gradients are reduce-scattered in ``reduce_dtype``, and the
    sharded master weights and optimizer state keep ``model.dtype``. ``activation_checkpointing`` recomputes
    each decoder layer in backward instead of keeping its activations."""

    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    activation_checkpointing: bool = True

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self, key) not in DTYPE_NAMES:
                raise ValueError(
                    f"fsdp.{key}={getattr(self, key)!r} is invalid: one of {', '.join(DTYPE_NAMES)} is accepted"
                )


SELECTIONS = ("first", "random")


@dataclass(frozen=True)
class RepromptConfig:
    """How the teacher's privileged contexts are chosen and rendered (``method.reprompt``; see
    :mod:`demopsd.training.reprompt`)."""

    template: str = "{prompt}\n{context}\n\nCorrectly solve the original question."
    """The teacher's user message; needs ``{prompt}`` and ``{context}``."""
    demonstration_template: str = "Correct solution:\n\n{solution}"
    answer_template: str = "The correct answer is {answer}."
    success_threshold: float = 0.5
    use_demonstrations: bool = True
    """Off: no sibling demonstrations, only the fallback (e.g. OPSD with the reference answer)."""
    use_reference_answer: bool = False
    remove_thinking: bool = True
    thinking_pattern: str = r"<think>.*?</think>\s*"
    """Regex (DOTALL) removed from demonstrations when ``remove_thinking`` is on."""
    selection: str = "first"
    """Which successful sibling: ``first`` in group order (SDPO) or ``random`` (seeded)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not one of {SELECTIONS}")
        for key, placeholders in (
            ("template", ("{prompt}", "{context}")),
            ("demonstration_template", ("{solution}",)),
            ("answer_template", ("{answer}",)),
        ):
            missing = [p for p in placeholders if p not in getattr(self, key)]
            if missing:
                raise ValueError(f"{key} must contain {' and '.join(placeholders)}; missing {', '.join(missing)}")
