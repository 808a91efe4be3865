"""The examples a ``data=`` section names (:class:`~demopsd.config.sections.DataConfig`): its ``source`` picks
SciKnowEval (:mod:`demopsd.data.sciknoweval`), GPQA (:mod:`demopsd.data.gpqa`) or the generated task
(:mod:`demopsd.data.synthetic`), and each example is scored under ``data.reward``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from demopsd.config.sections import DataConfig, GPQAData, SciKnowEvalData, SyntheticData
from demopsd.data.gpqa import load_gpqa
from demopsd.data.sciknoweval import load_sciknoweval
from demopsd.data.synthetic import generate_synthetic
from demopsd.data.types import LoadedSplit, check_on_bad_row


def load_split(
    data: DataConfig, split: str, data_dir: str | Path | None = None, *, on_bad_row: str | None = None
) -> LoadedSplit:
    """The ``split`` of the dataset ``data`` describes (its class, by ``source``, picks the loader), each example
    scored under ``data.reward``.

    Bad rows are handled as ``on_bad_row`` says, else as ``data.on_bad_row`` says; the result's ``skipped`` counts
    those left out (always 0 for the generated task).
    """
    loaded = _load_examples(data, split, data_dir, on_bad_row=check_on_bad_row(on_bad_row or data.on_bad_row))
    return LoadedSplit((dataclasses.replace(e, reward_rule=data.reward) for e in loaded), loaded.skipped)


def _load_examples(data: DataConfig, split: str, data_dir: str | Path | None, *, on_bad_row: str) -> LoadedSplit:
    if isinstance(data, SciKnowEvalData):
        return load_sciknoweval(data_dir, data.domain, split, on_bad_row=on_bad_row)
    if isinstance(data, GPQAData):
        if split != "test":
            raise ValueError(f"GPQA has only a test split; split={split!r} is not accepted (use it for evaluation)")
        return load_gpqa(data_dir, data.subset, seed=data.shuffle_seed, domains=data.domains, on_bad_row=on_bad_row,
                         prompt_style=data.prompt_style)
    if isinstance(data, SyntheticData):
        size = {"train": data.train_size, "test": data.test_size}.get(split)
        return LoadedSplit(generate_synthetic(data.kind, split, seed=data.generator_seed, size=size,
                                              balanced_letters=data.balanced_letters and split == "test"))
    raise TypeError(f"no loader for data.source={data.source!r} ({type(data).__name__})")
