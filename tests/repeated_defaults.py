"""Every value a conf/ YAML file writes that equals its settings dataclass's default: a default written twice.

    python -m tests.repeated_defaults [conf_dir]     # one line per repeat, then their count

Each leaf of each YAML file is placed at its full key (the file's group package, or the root for
``# @package _global_`` files and the entry configs) and compared with the default of the settings class that
key belongs to (:class:`~demopsd.config.run.TrainSettings`; the method kind, data source and rollout backend
picked as the file picks them). Interpolations (``${...}``) never count: they are not the default's value.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from demopsd.config.check import CONFIG_DIR
from demopsd.config.methods import METHODS
from demopsd.config.run import EvalRunSettings, TrainSettings
from demopsd.config.sections import DATA_SOURCES
from demopsd.config.settings import ROLLOUT_BACKENDS
from demopsd.config.settings import defaults_of

GROUP_PACKAGES = {"method": "method", "data": "data", "rollout": "rollout", "eval": "eval", "model": "model",
                  "paths": "paths", "logger": "logger"}


def repeated_defaults(conf_dir: Path = CONFIG_DIR) -> list[tuple[str, str, object]]:
    """``(file, full key, value)`` of every YAML value under ``conf_dir`` that repeats its dataclass default."""
    repeats = []
    for path in sorted(conf_dir.rglob("*.yaml")):
        relative = path.relative_to(conf_dir)
        text = path.read_text()
        content = yaml.safe_load(text) or {}
        if not isinstance(content, dict):
            continue
        package = _package(relative, text)
        if package is None:
            continue
        defaults = _defaults_for(relative, content, conf_dir)
        for key, value in _leaves(content, package):
            if key in defaults and _same(defaults[key], value):
                repeats.append((str(relative), key, value))
    return repeats


def _package(relative: Path, text: str) -> str | None:
    """Where the file's keys land: '' for the root, a section name, or None for files outside the settings."""
    if "@package _global_" in text or len(relative.parts) == 1:
        return ""
    return GROUP_PACKAGES.get(relative.parts[0])


def _defaults_for(relative: Path, content: dict, conf_dir: Path) -> dict[str, object]:
    """The full key → default of every setting the file may set, with the method kind, data source and rollout
    backend it picks (else the entry configs' defaults: distillation, SciKnowEval, hf)."""
    text = " ".join(str(entry) for entry in content.get("defaults", []))
    kind = _method_kind(relative, content, conf_dir)
    source = relative.parts[1] if relative.parts[0] == "data" and len(relative.parts) > 2 else next(
        (s for s in DATA_SOURCES if f"/data: {s}/" in text or f"'/data': '{s}/" in text), "sciknoweval")
    backend = next((b for b in ROLLOUT_BACKENDS if f"rollout: {b}" in text or f"'/rollout': '{b}'" in text
                    or relative == Path("rollout", f"{b}.yaml")), "hf")
    entry = EvalRunSettings if relative == Path("eval.yaml") else TrainSettings
    values = {key: value for key, value in defaults_of(entry).items() if key not in ("trainer", "callbacks")}
    values.update(method=defaults_of(METHODS[kind].settings), data=defaults_of(DATA_SOURCES[source]),
                  rollout=defaults_of(ROLLOUT_BACKENDS[backend]))
    return dict(_leaves(values, ""))


def _method_kind(relative: Path, content: dict, conf_dir: Path) -> str:
    if content.get("kind") in METHODS and relative.parts[0] == "method":
        return content["kind"]
    for entry in content.get("defaults", []):
        for kind in METHODS:
            if f"/settings/method/{kind}" in str(entry) or f"method: {kind}" in str(entry).replace("'", ""):
                return kind
        parent = conf_dir / "method" / f"{entry}.yaml"
        if relative.parts[0] == "method" and isinstance(entry, str) and parent.is_file():
            return _method_kind(Path("method", parent.name), yaml.safe_load(parent.read_text()), conf_dir)
    return "distill"


def _leaves(tree: dict, prefix: str) -> Iterator[tuple[str, object]]:
    for key, value in tree.items():
        if key in ("defaults", "hydra"):
            continue
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _leaves(value, full)
        else:
            yield full, value


def _same(default: object, value: object) -> bool:
    if isinstance(value, str) and "${" in value:
        return False
    if isinstance(default, tuple):
        default = list(default)
    return type(default) is type(value) and default == value or (
        isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
        and float(value) == default)


def main(argv: list[str]) -> int:
    conf_dir = Path(argv[0]) if argv else CONFIG_DIR
    repeats = repeated_defaults(conf_dir)
    for file, key, value in repeats:
        print(f"{file}: {key} = {value!r}")
    print(f"{len(repeats)} values in {conf_dir} repeat their dataclass default")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
