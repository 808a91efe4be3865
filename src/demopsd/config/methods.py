"""The method registry: one table from a method kind (``method.kind``) to its settings and its training step.

A kind of method is its objective, its settings class here (the ``method`` section, with ``objective`` typed by
the objective's settings), its step class (:mod:`demopsd.training.steps`, named by import path so that this module
stays free of torch), one :func:`register_method` call, and a ``conf/method/<name>.yaml`` whose defaults list
starts with ``/settings/method/<kind>@_here_``. The config check, the run builder, the report and the tests read
this table; nothing else names the kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hydra.core.config_store import ConfigStore

from demopsd.config.objectives import DistillationConfig, GRPOConfig
from demopsd.config.settings import RepromptConfig, check_rules, defaults_of

TEACHER_KINDS = ("ema", "live")


@dataclass(frozen=True)
class MethodConfig:
    """``method``: what every method has. ``name`` labels its runs (the option of ``conf/method/``); ``kind`` picks
    the row of :data:`METHODS`; ``mini_batch_size``: prompts per optimizer update, in whole groups of siblings
    (null: one update on the whole batch; it must divide ``data.batch_size``)."""

    SECTION: ClassVar[str] = "method"
    KIND: ClassVar[str] = ""
    name: str = ""
    kind: str = ""
    mini_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.mini_batch_size is None or self.mini_batch_size >= 1, "mini_batch_size", self.mini_batch_size,
             "null (one update per step) or a positive number of prompts"),
            *self.kind_rules(),
        )

    def kind_rules(self) -> tuple:
        """The rules of the kind's own keys, as ``check_rules`` takes them."""
        return ()

    def rollouts_needed(self, rollouts_per_prompt: int) -> str | None:
        """What ``rollout.n`` the method needs, when ``rollouts_per_prompt`` is not enough; None when it is."""
        return None

    def prompts_needed(self, prompts_per_process: int) -> str | None:
        """What the method needs of each training process's share of ``data.batch_size``, when
        ``prompts_per_process`` is not enough; None when it is."""
        return None


@dataclass(frozen=True)
class DistillMethodConfig(MethodConfig):
    """Self-distillation (DemoPSD, SDPO, OPSD): the student is pulled toward a teacher that sees a privileged
    context (``reprompt``); the teacher is the policy itself (``live``) or a moving average of it moved
    ``ema_rate`` toward the policy after every training step (``ema``)."""

    KIND: ClassVar[str] = "distill"
    kind: str = "distill"
    teacher: str = "ema"
    ema_rate: float = 0.05
    objective: DistillationConfig = field(default_factory=DistillationConfig)
    reprompt: RepromptConfig = field(default_factory=RepromptConfig)

    def kind_rules(self) -> tuple:
        return (
            (self.teacher in TEACHER_KINDS, "teacher", self.teacher, f"one of {TEACHER_KINDS}"),
            (self.teacher != "ema" or 0 < self.ema_rate <= 1, "ema_rate", self.ema_rate,
             "a value in (0, 1] (the EMA teacher's step toward the policy)"),
        )

    def rollouts_needed(self, rollouts_per_prompt: int) -> str | None:
        alone = not self.reprompt.use_demonstrations and self.reprompt.use_reference_answer
        if rollouts_per_prompt >= 2 or alone:
            return None
        return (f"an integer >= 2 for method {self.name!r} (demonstrations come from sibling rollouts; 1 only with "
                "method.reprompt.use_demonstrations=false and method.reprompt.use_reference_answer=true)")

    def prompts_needed(self, prompts_per_process: int) -> str | None:
        if not self.reprompt.placebo or prompts_per_process >= 2:
            return None
        return ("at least 2 prompts per training process under method.reprompt.placebo=true (the placebo context "
                "is another prompt's)")


@dataclass(frozen=True)
class GRPOMethodConfig(MethodConfig):
    """GRPO: group-relative advantages of the task reward under a clipped PPO ratio; four updates on a batch of
    32 prompts by default, as the reference's ``ppo_mini_batch_size`` of 8."""

    KIND: ClassVar[str] = "grpo"
    kind: str = "grpo"
    mini_batch_size: int | None = 8
    objective: GRPOConfig = field(default_factory=GRPOConfig)

    def rollouts_needed(self, rollouts_per_prompt: int) -> str | None:
        if rollouts_per_prompt >= 2:
            return None
        return "an integer >= 2 for GRPO (advantages are normalised within each prompt's group)"


@dataclass(frozen=True)
class MethodKind:
    """A row of the registry: the settings class of ``method`` and the dotted import path of the
    :class:`demopsd.training.steps.MethodStep` that trains with it."""

    settings: type[MethodConfig]
    step: str


METHODS: dict[str, MethodKind] = {}
"""Every kind of method, by ``method.kind``."""


def register_method(settings: type[MethodConfig], step: str) -> None:
    """Add (or replace) the kind ``settings.KIND``; its settings become ``/settings/method/<kind>`` for Hydra."""
    METHODS[settings.KIND] = MethodKind(settings, step)
    store_method_settings(settings)


def store_method_settings(settings: type[MethodConfig]) -> None:
    """``/settings/method/<kind>`` in Hydra's ConfigStore: the defaults of a kind of method."""
    ConfigStore.instance().store(group="settings/method", name=settings.KIND, node=defaults_of(settings))


register_method(DistillMethodConfig, "demopsd.training.steps.DistillationStep")
register_method(GRPOMethodConfig, "demopsd.training.steps.GRPOStep")
