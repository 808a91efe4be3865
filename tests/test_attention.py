"""Grouped-query attention on a CPU without copying key/value heads: the same numbers as transformers' "sdpa"."""

import copy

import pytest
import torch
import transformers.integrations.sdpa_attention

from demopsd.runtime.attention import GROUPED_SDPA, use_grouped_sdpa
from tests.helpers import tiny_llama


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded sequences of 9 and 5 tokens: ``ids`` and ``mask`` ``[2, 9]``."""
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 1, 30, 2], [0, 0, 0, 0, 11, 4, 17, 8, 6]])
    return ids, (ids != 0).long()


@pytest.fixture
def models():
    reference = tiny_llama().double()
    grouped = copy.deepcopy(reference)
    use_grouped_sdpa(grouped)
    assert (reference.config._attn_implementation, grouped.config._attn_implementation) == ("sdpa", GROUPED_SDPA)
    assert reference.model.layers[0].self_attn.num_key_value_groups == 2
    return reference, grouped


def test_logits_and_gradients_match_sdpa_on_a_padded_batch_without_copying_heads(models, monkeypatch):
    reference, grouped = models
    ids, mask = padded_batch()
    expected = reference(input_ids=ids, attention_mask=mask).logits
    expected[mask.bool()].sum().backward()

    def no_copies(*args):
        raise AssertionError("the key/value heads were copied")

    monkeypatch.setattr(transformers.integrations.sdpa_attention, "repeat_kv", no_copies)
    logits = grouped(input_ids=ids, attention_mask=mask).logits
    logits[mask.bool()].sum().backward()
    torch.testing.assert_close(logits[mask.bool()], expected[mask.bool()], rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(grouped.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_decoding_from_a_cache_matches_sdpa(models):
    reference, grouped = models
    ids, mask = padded_batch()
    common = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, **common, output_logits=True, return_dict_in_generate=True)
        ours = grouped.generate(input_ids=ids, **common, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(expected.logits), rtol=1e-12, atol=1e-12)


def test_a_model_not_on_sdpa_is_left_as_it_is():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    use_grouped_sdpa(model)
    assert model.config._attn_implementation == "eager"
