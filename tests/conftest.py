"""Shared test setup: no Hugging Face hub access, and one conversion of the default model per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported by any test module

import pytest


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """A cache root holding the converted default model, and the GGUF-loaded model it came from.

    Returns ``(cache_root, gguf_model)``; pass ``cache_dir=cache_root`` to
    ``load_model_and_tokenizer("smollm2-135m-instruct", ...)`` to load the converted copy.
    """
    from demopsd.models import default_cache_path, load_default_gguf, save_atomically

    root = tmp_path_factory.mktemp("demopsd-cache")
    model, tokenizer = load_default_gguf()
    save_atomically(model, tokenizer, default_cache_path(root))
    return root, model.eval()
