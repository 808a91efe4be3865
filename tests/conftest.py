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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_cache):
    """A randomly initialised 2-layer Llama with the default model's tokenizer: steps take milliseconds and
    checkpoints a few MB, so killed and resumed runs are cheap, while every code path is the real one."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from demopsd.models import default_cache_path

    tokenizer = AutoTokenizer.from_pretrained(default_cache_path(default_model_cache[0]))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=0.5,  # sharp, context-dependent distributions: teacher and student differ clearly
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
