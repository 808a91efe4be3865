"""Build a composed config's typed settings once, before anything heavy loads: every problem at once, one line each.

``validate_config(cfg)`` (``python src/train.py``) and ``validate_eval_config(cfg)`` (``python src/eval.py``)
return the run's settings, or raise :class:`ConfigError` whose message has one line per problem,
``<full.key>=<value!r>: <what is accepted>``. The settings dataclasses say what is checked:

* every key of every section: a key no dataclass has (a typo) is reported with the closest known key;
* every value's type, from the field's annotation, and every rule of each dataclass (each reports all its broken
  rules at once, as :class:`~demopsd.config.settings.SettingError` entries of field, value and what is accepted);
  ``method.kind``, ``data.source`` and ``rollout.backend`` pick the dataclass of their section;
* the rules across sections (:func:`train_rules`): rollouts per prompt for the method, the mini-batch against the
  batch and the processes, the engine's parallelism, and the trainer keys this project reads.

Only omegaconf, hydra and the torch-free settings modules are imported: a bad value stops ``python src/train.py``
within seconds, before torch, transformers or Lightning load.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from demopsd.config.methods import METHODS, MethodConfig
from demopsd.config.run import EvalRunSettings, TrainSettings
from demopsd.config.sections import DATA_SOURCES, DataConfig
from demopsd.config.settings import SET_ELSEWHERE, ROLLOUT_BACKENDS, RolloutConfig, SettingError, VLLMRolloutConfig

CONFIG_DIR = Path(__file__).resolve().parents[3] / "conf"

Report = Callable[[str, Any, str], None]


class ConfigError(ValueError):
    """A config that cannot run; ``problems`` holds one ``<key>=<value!r>: <accepted>`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def validate_config(cfg: DictConfig) -> TrainSettings:
    """The typed settings of the composed train config ``cfg``, or :class:`ConfigError` listing every problem."""
    return _validate(cfg, TrainSettings, train_rules)


def validate_eval_config(cfg: DictConfig) -> EvalRunSettings:
    """The typed settings of the composed eval config ``cfg``, or :class:`ConfigError` listing every problem. The
    train config's own keys, which a preset shared by both apps (``debug=smoke``, ``experiment=...``) may set, are
    left out."""
    train_only = {f.name for f in dataclasses.fields(TrainSettings)} \
        - {f.name for f in dataclasses.fields(EvalRunSettings)}
    return _validate(cfg, EvalRunSettings, lambda built, report: None, ignored=train_only)


def _validate(cfg: DictConfig, cls: type, cross_rules: Callable[[Any, Report], None], ignored: set[str] = frozenset()):
    problems: dict[str, str] = {}

    def report(key: str, value: Any, accepted: str) -> None:
        problems.setdefault(key, f"{key}={value!r}: {accepted}")

    values = {key: value for key, value in _resolved(cfg, report).items() if key not in ignored}
    built: dict[str, Any] = {}
    settings = build(cls, "", values, report, root=values, built=built)
    cross_rules(built, report)
    if problems:
        raise ConfigError(_without_echoes(problems, cfg))
    return dataclasses.replace(settings, resolved=values)


def train_rules(built: Mapping[str, Any], report: Report) -> None:
    """The rules across the sections of a train config, given its ``built`` sections by key (those that could be
    built: a rule whose sections could not is left for the next run of the check)."""
    method, rollout, data = built.get("method"), built.get("rollout"), built.get("data")
    trainer = built.get("trainer", {})
    needed = method.rollouts_needed(rollout.n) if method and rollout else None
    if needed:
        report("rollout.n", rollout.n, needed)
    if isinstance(rollout, VLLMRolloutConfig) and rollout.tensor_parallel_size != 1:
        report("rollout.tensor_parallel_size", rollout.tensor_parallel_size,
               "1 (the engine runs in the training process, one per device: the weight push hands it a "
               "generator of tensors, which a multi-process tensor-parallel engine would have to pickle)")
    if method and data:
        _check_mini_batch(method.mini_batch_size, data.batch_size, trainer, report)
        needed = method.prompts_needed(data.batch_size // (_processes(trainer) or 1))
        if needed:
            report("data.batch_size", data.batch_size, needed)
    if trainer.get("gradient_clip_val") is not None:
        report("trainer.gradient_clip_val", trainer["gradient_clip_val"],
               "not set: the module clips each update itself, to optim.grad_clip (null: no clipping)")
    max_steps = trainer.get("max_steps")
    if not (_is_int(max_steps) and (max_steps >= 1 or max_steps == -1)):
        report("trainer.max_steps", max_steps, "an integer >= 1, or -1 for no limit")


def _check_mini_batch(mini_batch_size: int | None, batch_size: int, trainer: Mapping, report: Report) -> None:
    """A mini-batch smaller than the batch must divide ``data.batch_size`` and split over the training processes."""
    if mini_batch_size is None or mini_batch_size >= batch_size:
        return
    if batch_size % mini_batch_size:
        report("method.mini_batch_size", mini_batch_size,
               f"a divisor of data.batch_size={batch_size} (each update takes an equal share of the step's prompts)")
        return
    processes = _processes(trainer)
    if processes and mini_batch_size % processes:
        report("method.mini_batch_size", mini_batch_size,
               f"a multiple of the {processes} training processes (trainer.devices × trainer.num_nodes): "
               "each process updates on its share of every mini-batch")


def _processes(trainer: Mapping) -> int | None:
    """The training processes ``trainer.devices × trainer.num_nodes``; None when they are not numbers (``auto``)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    return devices * nodes if _is_int(devices) and _is_int(nodes) else None


# ---------------------------------------------------------------------------------------------- building
VARIANTS: dict[type, tuple[str, Callable[[], Mapping[str, type]], str]] = {
    MethodConfig: ("kind", lambda: {kind: row.settings for kind, row in METHODS.items()}, "conf/method/"),
    DataConfig: ("source", lambda: DATA_SOURCES, "the folders of conf/data/"),
    RolloutConfig: ("backend", lambda: ROLLOUT_BACKENDS, "conf/rollout/"),
}
"""The sections whose dataclass one of their keys picks: that key, the table it picks from, where the options are."""


def build(cls: type, prefix: str, values: Any, report: Report, root: Mapping | None = None,
          built: dict[str, Any] | None = None):
    """The settings dataclass ``cls`` (or the variant ``values`` picks) built from ``values``, or None; every problem
    is reported: a value that is not a mapping, unknown keys, wrongly typed values (then left out) and each rule the
    dataclass finds broken. Nested dataclasses (and mappings of them) are built the same way; a field marked
    :data:`SET_ELSEWHERE` takes the top-level key of ``root`` it names. ``built`` collects the value of every key
    that could be built, by full key, even where its parent could not."""
    if not isinstance(values, Mapping):
        report(prefix, values, "a mapping of settings")
        return None
    cls = _variant(cls, prefix, values, report)
    if cls is None:
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "resolved"
              and SET_ELSEWHERE not in f.metadata}
    _unknown_keys(prefix, values, fields, report)
    kwargs = {f.name: root[f.metadata[SET_ELSEWHERE]] for f in dataclasses.fields(cls)
              if SET_ELSEWHERE in f.metadata and root and f.metadata[SET_ELSEWHERE] in root}
    complete = True
    for name, value in values.items():
        if name not in fields:
            continue
        field_value = _field_value(hints[name], _join(prefix, name), value, report, root, built)
        if field_value is _INVALID:
            complete = False
        else:
            kwargs[name] = field_value
            if built is not None:
                built[_join(prefix, name)] = field_value
    try:
        settings = cls(**kwargs)
    except SettingError as error:
        for name, value, accepted in error.problems:
            report(_join(prefix, name), value, accepted)
        return None
    return settings if complete else None


_INVALID = object()


def _field_value(hint: Any, key: str, value: Any, report: Report, root: Mapping | None,
                 built: dict[str, Any] | None = None) -> Any:
    """``value`` as the field annotated ``hint`` takes it (a nested dataclass built, a list as a tuple), or
    ``_INVALID`` after reporting why it cannot be."""
    if dataclasses.is_dataclass(hint):
        settings = build(hint, key, value, report, root, built)
        return _INVALID if settings is None else settings
    item = _mapping_item(hint)
    if item is not None:
        if not isinstance(value, Mapping):
            report(key, value, "a mapping of settings")
            return _INVALID
        entries = {name: _field_value(item, f"{key}.{name}", entry, report, root, built)
                   for name, entry in value.items()}
        return _INVALID if any(e is _INVALID for e in entries.values()) else entries
    expected = _type_problem(hint, value)
    if expected:
        report(key, value, expected)
        return _INVALID
    return tuple(value) if typing.get_origin(hint) is tuple else value


def _mapping_item(hint: Any) -> type | None:
    """The dataclass ``X`` of a ``dict[str, X]`` annotation, else None."""
    if typing.get_origin(hint) is dict:
        args = typing.get_args(hint)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return args[1]
    return None


def _variant(cls: type, prefix: str, values: Mapping, report: Report) -> type | None:
    """The dataclass of the section: ``cls`` itself, or for a section of :data:`VARIANTS` the one its key picks."""
    if cls not in VARIANTS:
        return cls
    key, table, where = VARIANTS[cls]
    options = table()
    choice = values.get(key)
    if choice not in options:
        report(_join(prefix, key), choice, f"one of {tuple(options)} ({where})")
        return None
    return options[choice]


def _unknown_keys(prefix: str, values: Mapping, accepted: set[str], report: Report) -> None:
    """Report the keys of ``values`` outside ``accepted``, with the closest one."""
    for key in values:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), sorted(accepted), n=1, cutoff=0.6)
            hint = f"did you mean {_join(prefix, close[0])}? " if close else ""
            report(_join(prefix, key), values[key],
                   f"not a key of {prefix or 'the config'}; {hint}accepted keys: {', '.join(sorted(accepted))}")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
               dict: "a mapping", tuple: "a list", list: "a list"}
_TYPE_CHECKS = {
    int: lambda v: _is_int(v), float: lambda v: _is_number(v), bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str), type(None): lambda v: v is None, dict: lambda v: isinstance(v, Mapping),
    tuple: lambda v: isinstance(v, (list, tuple)), list: lambda v: isinstance(v, (list, tuple)),
}


def _type_problem(hint: Any, value: Any) -> str | None:
    """What ``value`` should be when it does not fit the field annotation ``hint``, else None."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    bases = [typing.get_origin(arg) or arg for arg in (typing.get_args(hint) if union else (hint,))]
    if any(base not in _TYPE_CHECKS for base in bases):
        return None  # an annotation this check does not know: leave it to the dataclass
    if any(_TYPE_CHECKS[base](value) for base in bases):
        return None
    return " or ".join(_TYPE_WORDS[base] for base in bases)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# ---------------------------------------------------------------------------------------------- resolving
def _resolved(cfg: DictConfig, report: Report) -> dict:
    """``cfg`` as plain, resolved values, top-level key by key (one that cannot resolve is reported and left out).

    Outside a Hydra app (a config composed by a test or a script) ``${hydra:...}`` has nothing to resolve from:
    those values (the run directory) are null there.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        cfg = _without_hydra_interpolations(cfg)
    values = {}
    for key in cfg:
        node = cfg._get_node(key)
        try:
            values[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) \
                else cfg[key]
        except Exception as error:  # noqa: BLE001 - an interpolation that cannot resolve is a config problem
            raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node._value()
            report(str(key), raw, f"resolvable values ({error})".replace("\n", " "))
    return values


def _without_hydra_interpolations(cfg: DictConfig) -> DictConfig:
    raw = OmegaConf.to_container(cfg, resolve=False)
    copy = OmegaConf.create(raw)
    for key, value in _raw_leaves(raw, ""):
        if isinstance(value, str) and "${hydra:" in value:
            OmegaConf.update(copy, key, None)
    return copy


def _raw_leaves(tree: Any, prefix: str):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _raw_leaves(value, _join(prefix, key))
    else:
        yield prefix, tree


def _without_echoes(problems: dict[str, str], cfg: DictConfig) -> list[str]:
    """The problems, less those of a key whose value is just ``${other}`` of a key already reported (``eval.top_p``
    follows ``rollout.top_p``): one mistake, one line."""
    raw = dict(_raw_leaves(OmegaConf.to_container(cfg, resolve=False), ""))

    def echoes(key: str) -> bool:
        source = raw.get(key)
        return isinstance(source, str) and source.startswith("${") and source.endswith("}") \
            and source[2:-1] in problems
    return [line for key, line in problems.items() if not echoes(key)]
