"""Every ``src/train.py`` and ``src/eval.py`` command the README shows composes, GPU-only and multi-node ones
included (composing needs no GPU): a documented command can no longer fail at composition.

Commands are read from the fenced code blocks (continuation lines joined) and from inline code spans, as
``python src/<script>.py <overrides>`` or a ``torchrun … src/<script>.py <overrides>`` launch. Placeholders
(``...``, ``<the same overrides>``) and shell operators are dropped, ``-m`` and ``--cfg job`` are flags rather than
overrides, a placeholder inside a value (``ckpt_path=outputs/train/runs/<run>``) is filled with its name, and a
sweep (``seed=0,1,2``) composes with its first value, as the first job of the sweep does. Each plain key a command
sets must hold that value in the composed config (no preset named beside it takes it back).
"""

import re
import shlex
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.helpers import CONFIG_DIR, REPO_ROOT, compose_entry

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
SCRIPT = re.compile(r"(?:\bpython|^\s*torchrun\b.*?)\s+src/(train|eval)\.py\b(.*)")
FLAGS_WITH_A_VALUE = {"--cfg", "-c", "--package", "-p"}
FLAGS = {"-m", "--multirun", "--resolve"}
NOT_OVERRIDES = {"...", "&", "&&", ";", "|"}
PLACEHOLDER = re.compile(r"(?<!\S)<[^<>]*>(?!\S)")  # whole words in angle brackets: `<the same overrides>`
FILLED_IN = re.compile(r"<([^<>\s]*)>")  # a placeholder inside a value: `runs/<run>`


def code_lines(text: str) -> list[str]:
    """The README's code, a line each: fenced block lines with continuations joined, then inline code spans."""
    fenced, inline, block = [], [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            block = [] if block is None else fenced.extend(join_continuations(block))
            continue
        (block if block is not None else inline).append(line)
    spans = re.findall(r"`([^`]+)`", "\n".join(inline))
    return fenced + [" ".join(span.split()) for span in spans]


def join_continuations(lines: list[str]) -> list[str]:
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            joined.append(pending + line)
            pending = ""
    return joined


def readme_commands() -> list[tuple[str, list[str], str]]:
    """``(config name, overrides, the README's text)`` of every command."""
    commands = []
    for line in code_lines(README):
        if match := SCRIPT.search(line):
            script, arguments = match.groups()
            commands.append((script, overrides_of(arguments), line.strip()))
    return commands


def overrides_of(arguments: str) -> list[str]:
    words = shlex.split(FILLED_IN.sub(r"\1", PLACEHOLDER.sub(" ", arguments)), comments=True)
    overrides, skip = [], False
    for word in words:
        if skip or word in FLAGS or word in NOT_OVERRIDES:
            skip = False
            continue
        if word in FLAGS_WITH_A_VALUE:
            skip = True
            continue
        overrides.append(first_of_sweep(word))
    return overrides


def first_of_sweep(text: str) -> str:
    override = OverridesParser.create().parse_override(text)
    if not override.is_sweep_override():
        return text
    return f"{override.get_key_element()}={next(override.sweep_string_iterator())}"


COMMANDS = readme_commands()


def test_every_command_of_the_readme_is_read():
    """Counted a second way, on the raw text: each `python src/<script>.py` and each torchrun launch line."""
    raw = len(re.findall(r"python\s+src/(?:train|eval)\.py\b", README)) + len(re.findall(r"^\s*torchrun\b", README, re.M))
    print(f"{len(COMMANDS)} README commands composed")
    assert len(COMMANDS) == raw
    assert {script for script, _, _ in COMMANDS} == {"train", "eval"}
    assert any("trainer.num_nodes=2" in overrides for _, overrides, _ in COMMANDS)  # the multi-node launches


@pytest.mark.parametrize("script, overrides, text", COMMANDS, ids=[text[:90] for _, _, text in COMMANDS])
def test_the_readme_command_composes(script, overrides, text):
    cfg = compose_entry(script, overrides)
    for override in map(OverridesParser.create().parse_override, overrides):
        key = override.key_or_group
        if override.is_delete() or key.split(".")[0] == "hydra" or (CONFIG_DIR / key).is_dir():
            continue  # a group's option, or Hydra's own setting
        value = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value) == override.value(), key
