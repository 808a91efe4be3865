"""Token layout of rollouts: EOS masking, and hidden states aligned with the tokens they predict."""

import pytest
import torch

from demopsd.config.settings import SamplingConfig
from demopsd.rollout.batch import PromptBatch, response_mask
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from tests.helpers import tiny_llama


def test_response_mask_keeps_tokens_through_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9], [3, 6, 7, 8, 9]])
    mask = response_mask(ids, eos_ids=[2, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_hidden_states_predict_the_response_tokens_despite_left_padding():
    """Padded batch == each sequence alone: same next-token log-probs at every response position."""
    model = tiny_llama()
    prompts = [[11, 12, 13, 14, 15], [21, 22]]
    responses = [[31, 32, 33], [41, 42, 0]]
    resp_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        hidden = response_hidden_states(model, PromptBatch(ids, mask), torch.tensor(responses), resp_mask)
        batched = torch.log_softmax(hidden @ lm_head_weight(model).T, -1)
        for b, (prompt, response) in enumerate(zip(prompts, responses)):
            n = int(resp_mask[b].sum())
            alone = torch.log_softmax(model(torch.tensor([prompt + response[:n]])).logits[0], -1)
            expected = alone[len(prompt) - 1 : len(prompt) - 1 + n]
            torch.testing.assert_close(batched[b, :n], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"n": 0}, "rollout.n=0"), ({"temperature": 0.0}, "rollout.temperature=0.0"),
     ({"top_p": 1.5}, "rollout.top_p=1.5"), ({"max_new_tokens": 0}, "rollout.max_new_tokens=0")],
)
def test_bad_sampling_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
