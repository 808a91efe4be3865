"""Run settings that need no torch: read and checked before anything heavy is imported.

Field names are the Hydra keys of their config section (``SECTION``: ``rollout``, ``optim`` ...); each dataclass
checks every rule on construction and raises one :class:`SettingError` listing each broken rule as
``(field, value, what is accepted)``, so callers never parse messages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

WANDB_MODES = ("auto", "online", "offline", "disabled")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # of model.dtype and the fsdp dtypes
REWARD_RULES = ("answer_tag", "last_letter", "strict")
"""Accepted values of ``data.reward`` (see :mod:`demopsd.data.rewards`)."""


SET_ELSEWHERE = "set_elsewhere"
"""Field metadata naming the top-level key a field is taken from: it is not a key of its own section."""


def defaults_of(cls: type, keys: tuple[str, ...] | None = None) -> dict:
    """The defaults of the settings dataclass ``cls`` as a plain mapping of its keys (nested dataclasses too; not
    ``resolved``, nor the fields another key sets); only ``keys`` when given."""
    values = _keys_of(cls())
    return values if keys is None else {key: values[key] for key in keys}


def _keys_of(settings: Any) -> Any:
    if not dataclasses.is_dataclass(settings):
        return list(settings) if isinstance(settings, tuple) else settings
    return {f.name: _keys_of(getattr(settings, f.name)) for f in dataclasses.fields(settings)
            if f.name != "resolved" and SET_ELSEWHERE not in f.metadata}



class SettingError(ValueError):
    """The broken rules of one settings object of config section ``section``: ``problems`` holds
    ``(field, value, what is accepted)``; the message has one ``<section>.<field>=<value>`` clause per problem."""

    def __init__(self, section: str, problems: list[tuple[str, Any, str]]) -> None:
        super().__init__("; ".join(f"{section + '.' if section else ''}{name}={value!r} is invalid: {accepted} is accepted"
                                   for name, value, accepted in problems))
        self.section, self.problems = section, problems


def broken_rules(check: Callable[[], object], rename: Mapping[str, str] = {}) -> list[tuple[bool, str, Any, str]]:
    """The rules ``check()`` finds broken (it raises :class:`SettingError`; a parent's or a nested settings object's
    rules), as failed rules for :func:`check_rules`, their fields renamed by ``rename``; [] when all hold."""
    try:
        check()
    except SettingError as error:
        return [(False, rename.get(name, name), value, accepted) for name, value, accepted in error.problems]
    return []


def check_rules(section: str, *rules: tuple[bool, str, Any, str]) -> None:
    """Raise :class:`SettingError` for the rules ``(holds, field, value, accepted)`` that do not hold, if any."""
    problems = [(name, value, accepted) for holds, name, value, accepted in rules if not holds]
    if problems:
        raise SettingError(section, problems)


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample: ``n`` rollouts per prompt, at this temperature / top-p, up to ``max_new_tokens``."""

    SECTION: ClassVar[str] = "rollout"
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.n >= 1, "n", self.n, "at least 1 rollout per prompt"),
            (self.temperature > 0, "temperature", self.temperature, "a positive temperature"),
            (0 < self.top_p <= 1, "top_p", self.top_p, "a value in (0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "at least 1"),
        )


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate: ``k`` samples per question at ``temperature`` / ``top_p`` (the :class:`SamplingConfig` of
    :attr:`sampling`, under the same rules), plus a greedy answer."""

    SECTION: ClassVar[str] = "eval"
    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    greedy: bool = True
    batch_size: int = 8
    """Questions per ``generate`` call (each with ``k`` samples)."""
    max_examples: int | None = None
    """Answer the first this many questions of each dataset (``k`` samples and the greedy answer); ``None``: all."""
    probe: bool = True
    """Also read the policy's distribution over the option letters (see :mod:`demopsd.evaluation.evaluate`)."""
    probe_examples: int | None = None
    """Probe the first this many questions of each dataset, more or fewer than are answered (the probe costs one
    forward per question, an answer up to ``max_new_tokens``); ``None``: those answered."""
    probe_prefix: str = "<reasoning>\n</reasoning>\n<answer>\n"
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            *broken_rules(lambda: self.sampling, rename={"n": "k"}),  # SamplingConfig's, under this section's names
            (self.batch_size >= 1, "batch_size", self.batch_size, "at least 1"),
            (self.max_examples is None or self.max_examples >= 1, "max_examples", self.max_examples,
             "null or at least 1"),
            (self.probe_examples is None or self.probe_examples >= 1, "probe_examples", self.probe_examples,
             "null (the questions answered) or at least 1"),
            (self.probe or self.probe_examples is None, "probe_examples", self.probe_examples,
             "null while eval.probe is false"),
            (self.chunk_size >= 1, "chunk_size", self.chunk_size, "at least 1"),
        )

    def answered(self, available: int) -> int:
        """How many of a dataset's ``available`` questions are answered: the first ``max_examples``, at most all."""
        return available if self.max_examples is None else min(self.max_examples, available)

    def probed(self, available: int) -> int:
        """How many of them are probed: the first ``probe_examples`` (null: as many as are answered), none without
        ``probe``."""
        if not self.probe:
            return 0
        return self.answered(available) if self.probe_examples is None else min(self.probe_examples, available)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            n=self.k, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens
        )


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (AdamW, or SGD) with a linear learning-rate warm-up over ``warmup_steps`` training steps,
    gradients clipped to ``grad_clip``."""

    SECTION: ClassVar[str] = "optim"
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("adamw", "sgd")
    name: str = "adamw"
    """``adamw``: each step's size is set by the learning rate, whatever the gradient's norm (the reference's);
    ``sgd``: each step is ``lr`` times the (clipped) gradient, with ``momentum``, so a smaller gradient moves less."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates."""
    momentum: float = 0.0
    """SGD's momentum (heavy ball)."""
    warmup_steps: int = 0
    """The learning rate rises linearly from 0 at the first update to ``lr`` at update ``warmup_steps``."""
    grad_clip: float | None = 1.0
    """The gradient's global norm is clipped to this before each update (null: no clipping)."""
    log_update_norm: bool = False
    """Log ``train/update_norm``, the norm of the parameters' change in each update (a step's mean): it keeps a copy
    of the policy's weights (of each process's shard) during the optimizer step."""

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.name in self.OPTIMIZERS, "name", self.name, " or ".join(self.OPTIMIZERS)),
            (self.lr > 0, "lr", self.lr, "a positive learning rate"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip,
             "null (no clipping) or a positive norm"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "a value >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", list(self.betas),
             "two numbers in [0, 1)"),
            (self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0"),
            (0 <= self.momentum < 1 and (self.name == "sgd" or self.momentum == 0), "momentum", self.momentum,
             "0 with adamw (betas set its moments), a value in [0, 1) with sgd"),
        )


@dataclass(frozen=True)
class PromptConfig:
    """How examples become chat prompts: length limit and extra chat-template arguments."""

    max_prompt_tokens: int | None = None
    chat_template_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineConfig:
    """The vLLM engine (``rollout=vllm``) and its share of the machine it shares with training.

    ``gpu_memory_utilization`` is the fraction of GPU memory it reserves for weights and KV cache (of RAM on
    vLLM's CPU backend), unless ``kv_cache_memory_bytes`` sizes the KV cache directly; ``tensor_parallel_size``
    GPUs hold one copy of the model (only 1 runs: see :mod:`demopsd.config.check`). The null defaults depend on
    the machine and are resolved by :func:`demopsd.rollout.vllm.engine_arguments`:

    * ``dtype``: the engine's weights, which the policy's are cast to when pushed; null: bfloat16 on CUDA (the
      trainer's fp32 master weights stay in the trainer), the policy's own dtype elsewhere.
    * ``sleep_level``: vLLM's sleep mode between generations, so that training gets the engine's memory back:
      1 offloads the weights to host memory, 2 discards them (the next generation pushes them again), 0 keeps
      the engine resident; null: 2 on CUDA, 0 elsewhere (vLLM's CPU backend has no sleep mode).
    * ``enforce_eager``: no CUDA graphs or torch.compile (a faster start, slower decoding); null: eager on a
      CPU, CUDA graphs on a GPU.
    """

    SECTION: ClassVar[str] = "rollout"
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None
    dtype: str | None = None
    sleep_level: int | None = None

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", self.gpu_memory_utilization,
             "a fraction in (0, 1]"),
            (self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes >= 1, "kv_cache_memory_bytes",
             self.kv_cache_memory_bytes, "null or a positive number of bytes"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, "at least 1"),
            (self.dtype is None or self.dtype in DTYPE_NAMES, "dtype", self.dtype,
             f"null (bfloat16 on CUDA, else the policy's) or one of {', '.join(DTYPE_NAMES)}"),
            (self.sleep_level in (None, 0, 1, 2), "sleep_level", self.sleep_level,
             "null (2 on CUDA, else 0), 0 (no sleep mode), 1 (weights to host memory) or 2 (weights discarded)"),
        )


@dataclass(frozen=True)
class ShardingConfig:
    """Fully sharded data parallel (``trainer=fsdp``, the ``fsdp`` config section): weights are all-gathered
    in ``param_dtype`` for forward and backward, gradients are reduce-scattered in ``reduce_dtype``, and the
    sharded master weights and optimizer state keep ``model.dtype``. ``activation_checkpointing`` recomputes
    each decoder layer in backward instead of keeping its activations."""

    SECTION: ClassVar[str] = "fsdp"
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"
    activation_checkpointing: bool = True

    def __post_init__(self) -> None:
        check_rules(self.SECTION, *(
            (getattr(self, key) in DTYPE_NAMES, key, getattr(self, key), f"one of {', '.join(DTYPE_NAMES)}")
            for key in ("param_dtype", "reduce_dtype")
        ))


SELECTIONS = ("first", "random")


@dataclass(frozen=True)
class RepromptConfig:
    """How the teacher's privileged contexts are chosen and rendered (``method.reprompt``; see
    :mod:`demopsd.training.reprompt`)."""

    SECTION: ClassVar[str] = "method.reprompt"
    TRUNCATIONS: ClassVar[tuple[str, ...]] = ("right", "left", "error")
    """Accepted values of :attr:`truncation` (see :func:`demopsd.rollout.batch.encode_prompts`)."""
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
    seed: int = field(default=0, metadata={SET_ELSEWHERE: "seed"})
    """The run's ``seed`` (not a key of ``method.reprompt``)."""
    max_prompt_tokens: int | None = 10240
    """Most tokens of the teacher's prompt (system prompt, prompt and context, chat template included); None: no
    limit. The reference's ``max_reprompt_len``."""
    truncation: str = "right"
    """What a longer teacher prompt gets: ``right`` (its end is cut, as the reference's ``reprompt_truncation``),
    ``left`` (its start is cut) or ``error``."""
    placebo: bool = False
    """A control for leakage: each rollout's context is the one built for the rollout in the same place of the
    next prompt's group (cyclically), i.e. another question's demonstration or answer; what the real context
    adds over this placebo is what the teacher takes from it. Needs two prompts per training process."""

    def __post_init__(self) -> None:
        placeholders = {"template": ("{prompt}", "{context}"), "demonstration_template": ("{solution}",),
                        "answer_template": ("{answer}",)}
        check_rules(
            self.SECTION,
            (self.selection in SELECTIONS, "selection", self.selection, f"one of {SELECTIONS}"),
            (self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens",
             self.max_prompt_tokens, "null or an integer >= 1"),
            (self.truncation in self.TRUNCATIONS, "truncation", self.truncation, f"one of {self.TRUNCATIONS}"),
            *((all(p in getattr(self, key) for p in needed), key, getattr(self, key),
               f"a text containing {' and '.join(needed)}") for key, needed in placeholders.items()),
        )


@dataclass(frozen=True)
class RolloutConfig(SamplingConfig):
    """``rollout``: what to sample (:class:`SamplingConfig`) and which engine samples it: ``backend`` (a key of
    :data:`ROLLOUT_BACKENDS`): Hugging Face ``generate`` on the policy's live weights (``hf``)."""

    backend: str = "hf"


@dataclass(frozen=True)
class VLLMRolloutConfig(EngineConfig, RolloutConfig):
    """``rollout=vllm``: vLLM's offline engine colocated with training (:class:`EngineConfig`), sampling as
    :class:`SamplingConfig` says."""

    backend: str = "vllm"

    def __post_init__(self) -> None:
        check_rules(self.SECTION, *broken_rules(lambda: RolloutConfig.__post_init__(self)),
                    *broken_rules(lambda: EngineConfig.__post_init__(self)))


ROLLOUT_BACKENDS: dict[str, type[RolloutConfig]] = {"hf": RolloutConfig, "vllm": VLLMRolloutConfig}
"""The settings class of each ``rollout.backend``."""
