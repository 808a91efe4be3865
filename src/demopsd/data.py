"""Multiple-choice datasets: SciKnowEval L3 splits, and the dispatch to GPQA and the synthetic task.

The SciKnowEval splits are JSON Lines files at ``<data_dir>/sciknoweval/<domain>/{train,test}.json`` (the
layout of ``../shared/data``; see its README). They are read from the given directory, never copied
into the project. Where they are missing and the Hugging Face hub is reachable, they are built from
``hicai-zju/SciKnowEval`` exactly as the SDPO reference release built them and written there.
:func:`load_split` reads any ``data=`` config: ``source`` picks SciKnowEval, GPQA (:mod:`demopsd.gpqa`)
or the generated task (:mod:`demopsd.synthetic`)."""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("biology", "chemistry", "material", "physics")
SPLITS = ("train", "test")
HUB_DATASET = "hicai-zju/SciKnowEval"
MCQ_TYPES = ("mcq-4-choices", "mcq-2-choices")
SYSTEM_PROMPT = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>
"""
_OPTION_LINE = re.compile(r"^([A-Z]): ", re.MULTILINE)


@dataclass(frozen=True)
class MCQExample:
    """One multiple-choice question."""

    prompt: str
    """Question, ``A: ...`` option lines, then "Please reason step by step."."""
    answer: str
    """The correct option letter."""
    system: str
    idx: int
    letters: str
    """The option letters present in the prompt, e.g. ``"ABCD"`` or ``"AB"``."""


def student_conversation(example: MCQExample) -> list[dict[str, str]]:
    """The chat the policy answers: the task's system prompt, then the question."""
    return [{"role": "system", "content": example.system}, {"role": "user", "content": example.prompt}]


def option_letters(prompt: str) -> str:
    """The option letters of ``prompt``, from its ``X: ...`` lines; they must run A, B, C, ..."""
    letters = "".join(_OPTION_LINE.findall(prompt))
    if not letters or letters != string.ascii_uppercase[: len(letters)]:
        raise ValueError(f"prompt has option lines {letters!r}, expected consecutive letters from 'A': {prompt!r}")
    return letters


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` if given, else ``$DEMOPSD_DATA_DIR``, else ``./data``."""
    return Path(data_dir or os.environ.get("DEMOPSD_DATA_DIR") or "data").expanduser()


SOURCES = ("sciknoweval", "gpqa", "synthetic")


def load_split(data: Mapping, split: str, data_dir: str | Path | None = None) -> list[MCQExample]:
    """The ``split`` of the dataset a ``data=`` config describes (its ``source`` picks the loader)."""
    source = data["source"]
    if source == "sciknoweval":
        return load_sciknoweval(data_dir, data["domain"], split)
    if source == "gpqa":
        from demopsd.gpqa import load_gpqa

        if split != "test":
            raise ValueError(f"GPQA has only a test split; split={split!r} is not accepted (use it for evaluation)")
        return load_gpqa(data_dir, data["subset"], seed=data["shuffle_seed"], domains=data["domains"])
    if source == "synthetic":
        from demopsd.synthetic import generate_synthetic

        size = {"train": data.get("train_size"), "test": data.get("test_size")}.get(split)
        return generate_synthetic(data["kind"], split, seed=data.get("generator_seed", 0), size=size)
    raise ValueError(f"data.source={source!r} is invalid: one of {SOURCES} is accepted")


def load_sciknoweval(data_dir: str | Path | None, domain: str, split: str) -> list[MCQExample]:
    """The ``split`` of ``domain``, read from ``data_dir`` (built from the hub if missing)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown SciKnowEval domain {domain!r}; accepted: {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown SciKnowEval split {split!r}; accepted: {', '.join(SPLITS)}")
    root = resolve_data_dir(data_dir)
    path = root / "sciknoweval" / domain / f"{split}.json"
    if not path.exists():
        _build_from_hub(root, domain, path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                letters = option_letters(row["prompt"])
                if row["answer"] not in letters:
                    raise ValueError(f"{path}: idx {row['idx']} answer {row['answer']!r} not in {letters!r}")
                examples.append(MCQExample(row["prompt"], row["answer"], row["system"], int(row["idx"]), letters))
    return examples


def _build_from_hub(root: Path, domain: str, missing: Path) -> None:
    """Write both splits of ``domain`` under ``root`` from the hub, or explain how to supply them."""
    try:
        import datasets

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        rows = datasets.load_dataset(HUB_DATASET, split="test").filter(
            lambda r: r["domain"] == domain.capitalize()
            and r["details"]["level"] == "L3"
            and r["type"] in MCQ_TYPES
        )
        parts = rows.add_column("idx", list(range(len(rows)))).train_test_split(test_size=0.1, seed=42)
    except Exception as err:
        raise FileNotFoundError(
            f"SciKnowEval data not found: {missing} does not exist under the data directory {root}, and it could "
            f"not be built from the Hugging Face hub ({type(err).__name__}: {err}). Set paths.data_dir (or the "
            f"DEMOPSD_DATA_DIR environment variable) to a directory holding sciknoweval/<domain>/<split>.json; "
            f"with Hugging Face access the files are built there automatically."
        ) from err
    for split in SPLITS:
        out = root / "sciknoweval" / domain / f"{split}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in parts[split]:
                f.write(json.dumps(_to_row(r)) + "\n")
        tmp.replace(out)


def _to_row(r: dict) -> dict:
    """A hub record (with its index in the filtered set as ``idx``) in the layout of the shared files."""
    options = "\n".join(f"{label}: {text}" for label, text in zip(r["choices"]["label"], r["choices"]["text"]))
    question = r["question"].strip()
    return {
        "idx": r["idx"],
        "kind": "mcq",
        "dataset": "sciknoweval",
        "answer": r["answerKey"],
        "elo": 1500,
        "prompt": f"{question}\n\n{options}\nPlease reason step by step.",
        "description": f"{question} The solution will be evaluated in a mcq environment.",
        "tests": "-",
        "embedding": [],
        "system": SYSTEM_PROMPT,
    }
