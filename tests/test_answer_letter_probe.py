"""The training-time answer-letter probe: where a rollout wrote its letter, and the correct letter's token."""

import pytest
import torch

from demopsd.training.steps import answer_letter_positions


@pytest.fixture(scope="module")
def tokenizer(default_model_cache):
    from transformers import AutoTokenizer

    from demopsd.runtime.models import default_cache_path

    return AutoTokenizer.from_pretrained(default_cache_path(default_model_cache[0]))


def encode(tokenizer, texts):
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, ids))
    response_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, row_ids in enumerate(ids):
        response_ids[row, : len(row_ids)] = torch.tensor(row_ids)
        mask[row, : len(row_ids)] = 1
    return response_ids, mask


def test_the_last_letter_token_and_the_correct_letter_in_the_same_form(tokenizer):
    texts = [
        "<reasoning>A and B look close</reasoning>\n<answer>\nB\n</answer>",  # letter alone on its line
        "<reasoning>x</reasoning><answer> C</answer>",  # letter after a space
        "no answer at all",
        "<answer>\nD\n</answer>",
    ]
    response_ids, mask = encode(tokenizer, texts)
    rows, positions, correct = answer_letter_positions(
        tokenizer, response_ids, mask, ["B", "C", None, "D"], ["A", "B", "C", "D"]
    )
    assert rows == [0, 1, 3]  # the row without a parsed letter is left out
    for row, position, correct_id in zip(rows, positions, correct):
        written = tokenizer.decode([int(response_ids[row, position])])
        assert written.strip() == texts[row].split("<answer>")[-1].split("</answer>")[0].strip()
        # the last occurrence: the reasoning of row 0 mentions B earlier
        assert position == max(t for t in range(int(mask[row].sum())) if response_ids[row, t] == response_ids[row, position])
        assert tokenizer.decode([correct_id]) == written.replace(written.strip(), ["A", "B", "C", "D"][row])
