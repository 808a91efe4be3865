"""The examples a ``data=`` config names: its ``source`` picks SciKnowEval (:mod:`demopsd.data.sciknoweval`),
GPQA (:mod:`demopsd.data.gpqa`) or the generated task (:mod:`demopsd.data.synthetic`), and each example is
scored under ``data.reward``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from demopsd.config.settings import REWARD_RULES
from demopsd.data.gpqa import PROMPT_STYLES, load_gpqa
from demopsd.data.sciknoweval import load_sciknoweval
from demopsd.data.synthetic import generate_synthetic
from demopsd.data.types import LoadedSplit, check_on_bad_row

SOURCES = ("sciknoweval", "gpqa", "synthetic")
REFERENCE_REWARDS = {"sciknoweval": "answer_tag", "synthetic": "answer_tag", "gpqa": "last_letter"}
"""The SDPO reference's reward rule of each source, used where ``data.reward`` is not set."""


def load_split(
    data: Mapping, split: str, data_dir: str | Path | None = None, *, on_bad_row: str | None = None
) -> LoadedSplit:
    """The ``split`` of the dataset a ``data=`` config describes (its ``source`` picks the loader), each example
    scored under ``data.reward`` (default: the reference's rule of that source, :data:`REFERENCE_REWARDS`).

    Bad rows are handled as ``on_bad_row`` says, else as ``data.on_bad_row`` says, else they are an error;
    the result's ``skipped`` counts those left out (always 0 for the generated task).
    """
    rule = data.get("reward") or REFERENCE_REWARDS.get(data["source"], "answer_tag")
    if rule not in REWARD_RULES:
        raise ValueError(f"data.reward={rule!r} is invalid: one of {REWARD_RULES} is accepted")
    loaded = _load_examples(data, split, data_dir, on_bad_row=on_bad_row)
    return LoadedSplit((dataclasses.replace(e, reward_rule=rule) for e in loaded), loaded.skipped)


def _load_examples(
    data: Mapping, split: str, data_dir: str | Path | None = None, *, on_bad_row: str | None = None
) -> LoadedSplit:
    on_bad_row = check_on_bad_row(on_bad_row or data.get("on_bad_row") or "error")
    source = data["source"]
    if source == "sciknoweval":
        return load_sciknoweval(data_dir, data["domain"], split, on_bad_row=on_bad_row)
    if source == "gpqa":
        if split != "test":
            raise ValueError(f"GPQA has only a test split; split={split!r} is not accepted (use it for evaluation)")
        return load_gpqa(
            data_dir, data["subset"], seed=data["shuffle_seed"], domains=data["domains"], on_bad_row=on_bad_row,
            prompt_style=data.get("prompt_style", PROMPT_STYLES[0]),
        )
    if source == "synthetic":
        size = {"train": data.get("train_size"), "test": data.get("test_size")}.get(split)
        return LoadedSplit(generate_synthetic(data["kind"], split, seed=data.get("generator_seed", 0), size=size))
    raise ValueError(f"data.source={source!r} is invalid: one of {SOURCES} is accepted")
