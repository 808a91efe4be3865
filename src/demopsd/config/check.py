"""Build a composed config's typed settings once, before anything heavy loads: every problem at once, one line each.

``validate_config(cfg)`` returns the run's :class:`~demopsd.config.run.TrainSettings`, or raises
:class:`ConfigError` whose message has one line per problem, ``<full.key>=<value!r>: <what is accepted>``.
Checked:

* unknown keys (typos) in ``method``, ``method.objective``, ``method.reprompt``, ``rollout``, ``optim``,
  ``data``, ``checkpoint`` and ``eval``, with the closest known key. Where a section is splatted into a settings
  dataclass (``DistillationConfig`` / ``GRPOConfig``, ``RepromptConfig``, ``SamplingConfig``, ``OptimConfig``,
  ``EvalConfig``)
  its fields are the accepted keys; otherwise the keys conf/ composes for the same group choices are;
* the values of those dataclasses, by building them (each reports all its broken rules at once, as
  :class:`~demopsd.config.settings.SettingError` entries of field, value and what is accepted);
* the rules no dataclass holds: method kind, teacher, EMA rate, rollouts per prompt for the method, the
  rollout backend, batch size, prompt limit, reward rule, when to evaluate, ``trainer.max_steps``,
  ``logger.wandb.mode``, the data source and the seed.

Only omegaconf, hydra and the torch-free settings modules are imported: a bad value stops
``python src/train.py`` within seconds, before torch, transformers or Lightning load.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from demopsd.config.batching import MemoryConfig
from demopsd.config.objectives import DistillationConfig, GRPOConfig
from demopsd.config.run import EvalSettings, MethodSettings, TrainSettings
from demopsd.config.settings import (
    METHOD_KINDS,
    REWARD_RULES,
    ROLLOUT_BACKENDS,
    TEACHER_KINDS,
    WANDB_MODES,
    EngineConfig,
    EvalConfig,
    OptimConfig,
    PromptConfig,
    RepromptConfig,
    SamplingConfig,
    SettingError,
    ShardingConfig,
)

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR.parents[2] / "conf"

_REPROMPT_SET_ELSEWHERE = ("seed",)  # RepromptConfig.seed is the top-level `seed`


class ConfigError(ValueError):
    """A config that cannot run; ``problems`` holds one ``<key>=<value!r>: <accepted>`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def validate_config(cfg: DictConfig) -> TrainSettings:
    """The typed settings of the composed train config ``cfg``, or :class:`ConfigError` listing every problem."""
    problems: list[str] = []
    reported: set[str] = set()

    def report(key: str, value: Any, accepted: str) -> None:
        problems.append(f"{key}={value!r}: {accepted}")
        reported.add(key)

    sections = {}
    for key in ("method", "method.objective", "method.reprompt", "rollout", "optim", "data", "checkpoint",
                "trainer", "logger", "fsdp", "model", "eval", "memory"):
        sections[key] = _section(cfg, key, report)
    reference = _reference_config(cfg)

    # -- method: kind picks the objective; name is free when the kind is known
    method = sections["method"]
    kinds = METHOD_KINDS
    kind = method.get("kind")
    if kind not in kinds:
        names = tuple(sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")))
        report("method.kind", kind, f"one of {kinds} (the methods of conf/method/ are {names})")
    distills, grpo = kind == "distill", kind == "grpo"
    _unknown_keys("method", method, _keys(reference, "method"), report)

    objective = reprompt = None
    if distills or grpo:
        objective = _check_dataclass(DistillationConfig if distills else GRPOConfig, "method.objective",
                                     sections["method.objective"], report)
    if distills:
        reprompt = _check_dataclass(RepromptConfig, "method.reprompt", sections["method.reprompt"], report,
                                    set_elsewhere=_REPROMPT_SET_ELSEWHERE)
        teachers = TEACHER_KINDS
        teacher = method.get("teacher")
        if teacher not in teachers:
            report("method.teacher", teacher, f"one of {teachers}")
        if teacher == "ema":
            rate = method.get("ema_rate")
            if not (_is_number(rate) and 0 < rate <= 1):
                report("method.ema_rate", rate, "a value in (0, 1] (the EMA teacher's step toward the policy)")

    # -- rollouts: the dataclass's rules, then how many siblings the method needs
    rollout = sections["rollout"]
    # without a reference (a config from another search path), the keys any conf/rollout option defines
    extra_rollout_keys = _keys(reference, "rollout") or _option_keys("rollout")
    sampling = _check_dataclass(SamplingConfig, "rollout", rollout, report, extra_keys=extra_rollout_keys)
    backend = rollout.get("backend", "hf")
    if backend not in ROLLOUT_BACKENDS:
        report("rollout.backend", backend, f"one of {ROLLOUT_BACKENDS}")
    engine = EngineConfig()
    if backend == "vllm":
        engine = _check_dataclass(EngineConfig, "rollout", rollout, report, extra_keys=extra_rollout_keys)
        if rollout.get("tensor_parallel_size", 1) != 1 and "rollout.tensor_parallel_size" not in reported:
            report("rollout.tensor_parallel_size", rollout.get("tensor_parallel_size"),
                   "1 (the engine runs in the training process, one per device: the weight push hands it a "
                   "generator of tensors, which a multi-process tensor-parallel engine would have to pickle)")
    n = rollout.get("n")
    if n == 1 and "rollout.n" not in reported:
        reprompt_keys = sections["method.reprompt"]
        if grpo:
            report("rollout.n", n, "an integer >= 2 for GRPO (advantages are normalised within each prompt's group)")
        elif distills and (reprompt_keys.get("use_demonstrations", True)
                           or not reprompt_keys.get("use_reference_answer")):
            report("rollout.n", n, f"an integer >= 2 for method {method.get('name')!r} (demonstrations come from "
                                   "sibling rollouts; 1 only with method.reprompt.use_demonstrations=false and "
                                   "method.reprompt.use_reference_answer=true)")

    optim = _check_dataclass(OptimConfig, "optim", sections["optim"], report)
    sharding = _check_dataclass(ShardingConfig, "fsdp", sections["fsdp"], report)

    # -- data and checkpoints: keys from conf/ for that data source
    data = sections["data"]
    sources = tuple(sorted(p.name for p in (CONFIG_DIR / "data").iterdir() if p.is_dir()))
    if data.get("source") not in sources:
        report("data.source", data.get("source"), f"one of {sources} (the folders of conf/data/)")
    else:
        _unknown_keys("data", data, _keys(reference, "data"), report)
    batch_size = data.get("batch_size")
    if not (_is_int(batch_size) and batch_size >= 1):
        report("data.batch_size", batch_size, "an integer >= 1 (prompts per training step)")
    if "reward" in data and data["reward"] not in REWARD_RULES:
        report("data.reward", data["reward"], f"one of {REWARD_RULES} (src/demopsd/data/rewards.py)")
    _unknown_keys("checkpoint", sections["checkpoint"], _keys(reference, "checkpoint"), report)

    updates_per_batch = _check_mini_batch(method.get("mini_batch_size"), batch_size, sections["trainer"], report)
    memory = _check_dataclass(MemoryConfig, "memory", sections["memory"], report)

    # -- trainer and logger
    if sections["trainer"].get("gradient_clip_val") is not None:
        report("trainer.gradient_clip_val", sections["trainer"]["gradient_clip_val"],
               "not set: the module clips each update itself, to optim.grad_clip (null: no clipping)")
    max_steps = sections["trainer"].get("max_steps")
    if not (_is_int(max_steps) and (max_steps >= 1 or max_steps == -1)):
        report("trainer.max_steps", max_steps, "an integer >= 1, or -1 for no limit")
    wandb = sections["logger"].get("wandb")
    if isinstance(wandb, Mapping):
        modes = WANDB_MODES
        if wandb.get("mode") not in modes:
            report("logger.wandb.mode", wandb.get("mode"), f"one of {modes}")

    raw_eval = OmegaConf.select(cfg, "eval", default=None, throw_on_resolution_failure=False)
    raw_eval = OmegaConf.to_container(raw_eval, resolve=False) if isinstance(raw_eval, DictConfig) else {}

    def report_unless_inherited(key: str, value: Any, accepted: str) -> None:
        """Report an ``eval`` key unless its value is ``${<key>}`` of a key already reported (rollout.top_p ...)."""
        source = raw_eval.get(key.removeprefix("eval."))
        if not (isinstance(source, str) and source.startswith("${") and source[2:-1] in reported):
            report(key, value, accepted)

    evaluation = _check_evaluation(sections["eval"], report_unless_inherited)

    max_prompt_tokens = data.get("max_prompt_tokens")
    if not (_is_int(max_prompt_tokens) and max_prompt_tokens >= 1):
        report("data.max_prompt_tokens", max_prompt_tokens,
               "an integer >= 1 (longer training prompts are left out, or refused: data.on_long_prompt)")
    for key, accepted in (("on_long_prompt", ("filter", "error")), ("prompt_style", ("reference", "sciknoweval"))):
        if key in data and data[key] not in accepted:
            report(f"data.{key}", data[key], f"one of {accepted}")
    if not _is_int(cfg.get("seed")):
        report("seed", cfg.get("seed"), "an integer")

    if problems:
        raise ConfigError(problems)
    return TrainSettings(
        seed=cfg.seed,
        method=MethodSettings(
            name=method.get("name", kind),
            objective=objective,
            reprompt=dataclasses.replace(reprompt, seed=cfg.seed) if reprompt else None,
            teacher=method.get("teacher", "ema"),
            ema_rate=method.get("ema_rate", 0.05),
            updates_per_batch=updates_per_batch,
        ),
        sampling=sampling,
        backend=backend,
        engine=engine,
        optim=optim,
        prompts=PromptConfig(max_prompt_tokens, sections["model"].get("chat_template_kwargs") or {}),
        sharding=sharding,
        evaluation=evaluation,
        memory=memory,
    )


# ---------------------------------------------------------------------------------------------- pieces
EVAL_SCHEDULE = {"every_n_steps": 0, "at_start": False, "at_end": True}
EVAL_DATASETS = ("in_domain", "ood")
"""Keys of ``eval`` that name what is evaluated (read with the data sections) rather than how or when."""


def _check_evaluation(values: Mapping, report) -> EvalSettings | None:
    """The ``eval`` section's settings: :class:`EvalConfig` from its keys, and when to evaluate."""
    config = _check_dataclass(EvalConfig, "eval", values, report, extra_keys=(*EVAL_SCHEDULE, *EVAL_DATASETS))
    schedule = {key: values.get(key, default) for key, default in EVAL_SCHEDULE.items()}
    if not (_is_int(schedule["every_n_steps"]) and schedule["every_n_steps"] >= 0):
        report("eval.every_n_steps", schedule["every_n_steps"], "0 (never) or a positive number of training steps")
    for key in ("at_start", "at_end"):
        if not isinstance(schedule[key], bool):
            report(f"eval.{key}", schedule[key], "true or false")
    return EvalSettings(config, **schedule) if config is not None else None


def _check_mini_batch(mini_batch_size: Any, batch_size: Any, trainer: Mapping, report) -> int:
    """Optimizer updates per step for ``method.mini_batch_size`` prompts per update (null, or at least the whole
    batch: one update); it must divide ``data.batch_size`` and split over the training processes."""
    if mini_batch_size is None:
        return 1
    if not (_is_int(mini_batch_size) and mini_batch_size >= 1):
        report("method.mini_batch_size", mini_batch_size, "null (one update per step) or a positive number of prompts")
        return 1
    if not (_is_int(batch_size) and batch_size >= 1) or mini_batch_size >= batch_size:
        return 1
    if batch_size % mini_batch_size:
        report("method.mini_batch_size", mini_batch_size,
               f"a divisor of data.batch_size={batch_size} (each update takes an equal share of the step's prompts)")
        return 1
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if _is_int(devices) and _is_int(nodes) and mini_batch_size % (devices * nodes):
        report("method.mini_batch_size", mini_batch_size,
               f"a multiple of the {devices * nodes} training processes (trainer.devices × trainer.num_nodes): "
               "each process updates on its share of every mini-batch")
        return 1
    return batch_size // mini_batch_size


def _section(cfg: DictConfig, key: str, report) -> dict:
    """``cfg``'s section ``key`` as a plain, resolved dict ({} when absent; reported when not a mapping)."""
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        report(key, node, "a mapping of settings")
        return {}
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception as error:  # noqa: BLE001 - an interpolation that cannot resolve is a config problem
        report(key, OmegaConf.to_container(node, resolve=False), f"resolvable values ({error})".replace("\n", " "))
        return {}


def _unknown_keys(prefix: str, values: Mapping, accepted: set[str] | None, report) -> None:
    """Report the keys of ``values`` outside ``accepted`` (None: not known, no check), with the closest one."""
    if accepted is None:
        return
    for key in values:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.6)
            hint = f"did you mean {prefix}.{close[0]}? " if close else ""
            report(f"{prefix}.{key}", values[key],
                   f"not a key of {prefix}; {hint}accepted keys: {', '.join(sorted(accepted))}")


def _check_dataclass(cls: type, prefix: str, values: Mapping, report, *, extra_keys=(), set_elsewhere=()):
    """The settings dataclass ``cls`` built from the keys of ``values`` that are its fields, or None; every
    problem is reported: unknown keys and wrongly typed values (then left out), and each rule the dataclass
    finds broken (its :class:`SettingError` lists them all)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in set_elsewhere}
    _unknown_keys(prefix, values, set(fields) | set(extra_keys), report)
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            continue
        expected = _type_problem(fields[name].type, value)
        if expected:
            report(f"{prefix}.{name}", value, expected)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except SettingError as error:
        for name, value, accepted in error.problems:
            report(f"{prefix}.{name}", value, accepted)
    return None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "None": "null", "dict": "a mapping", "tuple": "a list", "list": "a list"}


def _type_problem(annotation: Any, value: Any) -> str | None:
    """What ``value`` should be when it does not fit the field annotation ``annotation``, else None."""
    if not isinstance(annotation, str):
        annotation = getattr(annotation, "__name__", str(annotation))
    bases = [part.strip().split("[", 1)[0] for part in annotation.split("|")]
    if any(base not in _TYPE_WORDS for base in bases):
        return None  # an annotation this check does not know: leave it to the dataclass
    checks = {
        "int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
        "None": lambda v: v is None, "dict": lambda v: isinstance(v, Mapping),
        "tuple": lambda v: isinstance(v, (list, tuple)), "list": lambda v: isinstance(v, (list, tuple)),
    }
    if any(checks[base](value) for base in bases):
        return None
    return " or ".join(_TYPE_WORDS[base] for base in bases)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- reference keys
def _option_keys(group: str) -> set[str]:
    """The top-level keys that any option of the flat config group ``group`` in conf/ defines."""
    return {key for path in (CONFIG_DIR / group).glob("*.yaml") for key in OmegaConf.load(path)}


def _keys(reference: DictConfig | None, key: str) -> set[str] | None:
    """The keys of section ``key`` in the reference config; None (no check) when it cannot be known."""
    if reference is None:
        return None
    node = OmegaConf.select(reference, key, default=None, throw_on_resolution_failure=False)
    return set(node.keys()) if isinstance(node, DictConfig) else None


def _reference_config(cfg: DictConfig) -> DictConfig | None:
    """The config conf/ composes for ``cfg``'s group choices with no key overrides (None if it cannot).

    Inside a Hydra app the choices are the app's own; elsewhere (a config composed by a test or a script)
    they are read back from ``cfg``: the method option named ``method.name``, the option of ``data.source``
    whose ``name`` is ``data.name``, the rollout option named ``rollout.backend``.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    try:
        if HydraConfig.initialized() and GlobalHydra.instance().is_initialized():
            from hydra import compose

            hydra_cfg = HydraConfig.get()
            choices = {group: option for group, option in hydra_cfg.runtime.choices.items()
                       if option is not None and "/" not in group and "@" not in group}
            return compose(config_name=hydra_cfg.job.config_name, overrides=_overrides(choices))
        if GlobalHydra.instance().is_initialized():
            return None  # someone else's Hydra session: do not disturb it
        return _compose_conf(tuple(sorted(_choices_from(cfg).items())))
    except Exception:  # noqa: BLE001 - without a reference, only the dataclass-backed sections are checked
        return None


@functools.lru_cache(maxsize=32)
def _compose_conf(choices: tuple[tuple[str, str], ...]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=_overrides(dict(choices)))


def _overrides(choices: Mapping[str, str]) -> list[str]:
    return [f"{group}={option}" for group, option in choices.items()]


def _choices_from(cfg: DictConfig) -> dict[str, str]:
    choices = {}
    name = OmegaConf.select(cfg, "method.name", default=None, throw_on_resolution_failure=False)
    if isinstance(name, str) and (CONFIG_DIR / "method" / f"{name}.yaml").is_file():
        choices["method"] = name
    backend = OmegaConf.select(cfg, "rollout.backend", default=None, throw_on_resolution_failure=False)
    if isinstance(backend, str) and (CONFIG_DIR / "rollout" / f"{backend}.yaml").is_file():
        choices["rollout"] = backend
    source = OmegaConf.select(cfg, "data.source", default=None, throw_on_resolution_failure=False)
    source_dir = CONFIG_DIR / "data" / str(source)
    if isinstance(source, str) and source_dir.is_dir():
        options = sorted(p for p in source_dir.glob("*.yaml") if not p.stem.startswith("_"))
        data_name = OmegaConf.select(cfg, "data.name", default=None, throw_on_resolution_failure=False)
        named = [p for p in options if OmegaConf.load(p).get("name") == data_name]
        if named or options:
            choices["data"] = f"{source}/{(named or options)[0].stem}"
    return choices
