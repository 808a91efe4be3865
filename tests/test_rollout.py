"""Token layout of rollouts: EOS masking, hidden states aligned with the tokens they predict, and ``generate``
from prompts read once."""

import pytest
import torch

from demopsd.config.settings import PromptConfig, SamplingConfig
from demopsd.data.rewards import score_mcq
from demopsd.data.types import MCQExample, student_conversation
from demopsd.rollout.batch import (
    PromptBatch,
    RolloutBatch,
    encode_prompts,
    eos_token_ids,
    repeat_prompts,
    response_mask,
)
from demopsd.rollout.engine import generate_rollouts
from demopsd.rollout.forward import lm_head_weight, response_hidden_states
from demopsd.rollout.scored import scored_rollouts
from tests.fixed_step import default_tokenizer
from tests.helpers import tiny_llama, tiny_policy


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


@pytest.mark.parametrize("greedy", [False, True])
def test_generate_reads_each_prompt_once_and_samples_what_plain_generate_samples(greedy):
    """Rollouts from the shared prompt cache are token for token those of ``generate`` on the repeated prompts
    (same seed), for left-padded prompts of different lengths; the prompts pass through the model once each."""
    tokenizer = default_tokenizer()
    model = tiny_policy(tokenizer).eval()
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": "Which letter? A or B."}],
                                         [{"role": "user", "content": "Name a colour, any colour you like best."}]])
    assert (prompts.mask == 0).any(), "the prompts should need padding"
    sampling = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12)
    copies = 1 if greedy else sampling.n
    rows_seen = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: rows_seen.append(tuple(args[0].shape)))

    torch.manual_seed(7)
    ours = generate_rollouts(model, tokenizer, prompts, sampling, greedy=greedy)
    assert rows_seen[0] == (2, prompts.ids.shape[1] - 1)  # the prompts, once each, all but their last token
    assert all(shape == (2 * copies, 1) for shape in rows_seen[1:])  # then one token per row per step

    repeated = repeat_prompts(prompts, copies)
    decoding = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_p": 0.9, "top_k": 0}
    torch.manual_seed(7)
    with torch.no_grad():
        plain = model.generate(input_ids=repeated.ids, attention_mask=repeated.mask, max_new_tokens=12,
                               eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                               **decoding)[:, repeated.ids.shape[1]:]
    plain = plain.masked_fill(response_mask(plain, eos_token_ids(model, tokenizer)) == 0, tokenizer.pad_token_id)
    assert ours.response_ids.shape[0] == 2 * copies and ours.group_size == copies
    assert torch.equal(ours.response_ids, plain)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 0.8)])
def test_entropy_measured_while_sampling_is_that_of_a_forward_pass_over_the_responses(temperature, top_p):
    """The entropy ``generate`` records at each step is the full-vocabulary entropy of the model's own next-token
    distribution (not of the temperature- or top-p-warped one), token by token as a forward pass over prompt and
    response recomputes it, for left-padded prompts and rows that end early; the sampled tokens do not change."""
    tokenizer = default_tokenizer()
    model = tiny_policy(tokenizer).eval()
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": "Which letter? A or B."}],
                                         [{"role": "user", "content": "Name a colour, any colour you like best."}]])
    sampling = SamplingConfig(n=3, temperature=temperature, top_p=top_p, max_new_tokens=16)
    torch.manual_seed(3)
    frequent = generate_rollouts(model, tokenizer, prompts, sampling).response_ids.flatten().mode().values
    model.generation_config.eos_token_id = int(frequent)  # so that some rows end early
    torch.manual_seed(3)
    measured = generate_rollouts(model, tokenizer, prompts, sampling, entropy=True)
    torch.manual_seed(3)
    plain = generate_rollouts(model, tokenizer, prompts, sampling)
    assert torch.equal(measured.response_ids, plain.response_ids) and plain.token_entropy is None
    mask = measured.response_mask.bool()
    assert not mask.all(), "some rows should end before max_new_tokens"
    assert measured.token_entropy.shape == measured.response_ids.shape and not measured.token_entropy[~mask].any()
    with torch.no_grad():
        hidden = response_hidden_states(model, measured.prompt, measured.response_ids, measured.response_mask)
        log_probs = (hidden[mask] @ lm_head_weight(model).T).double().log_softmax(-1)
    recomputed = -(log_probs.exp() * log_probs).sum(-1)
    assert recomputed.std() > 0.05, "the entropies should differ from token to token"
    torch.testing.assert_close(measured.token_entropy[mask].double(), recomputed, atol=1e-4, rtol=1e-4)


def test_a_rollout_batch_refuses_rows_that_are_not_whole_groups():
    ids = torch.ones(6, 2, dtype=torch.long)
    prompt = PromptBatch(ids, ids)
    assert RolloutBatch(prompt, ids, ids, ["x"] * 6, 0.0, group_size=3).group_size == 3
    for group_size in (4, 0):
        with pytest.raises(ValueError, match=f"group_size={group_size}"):
            RolloutBatch(prompt, ids, ids, ["x"] * 6, 0.0, group_size=group_size)


# ------------------------------------------------------------------------------------ scored rollouts
class ServedTexts:
    """A rollout engine that answers with ``texts`` (one token each) and keeps the prompts it was given."""

    uses_policy_weights = False

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.prompts = texts, []

    def generate(self, prompts, sampling, greedy=False, entropy=False):
        self.prompts.append(prompts)
        ids = torch.ones(len(self.texts), 1, dtype=torch.long)
        return RolloutBatch(repeat_prompts(prompts, sampling.n), ids, ids, list(self.texts), 0.0, sampling.n)


def test_scored_rollouts_give_each_row_its_question_and_its_score():
    """Three rollouts of two questions with other answers and reward rules: each row is scored against its own
    question (a bare letter counts under ``answer_tag``, not under ``strict``)."""
    tokenizer = default_tokenizer()
    questions = [MCQExample("Which letter? A or B.", "A", "Answer.", 0, "AB"),
                 MCQExample("Which letter? A, B or C.", "C", None, 1, "ABC", reward_rule="strict")]
    texts = ["<answer>A</answer>", "<answer>B</answer>", "A", "<answer>C</answer>", "C", "<answer>A</answer>"]
    engine = ServedTexts(texts)
    rollouts, examples, scores = scored_rollouts(engine, tokenizer, questions, SamplingConfig(n=3), PromptConfig())

    assert rollouts.texts == texts and examples == [questions[0]] * 3 + [questions[1]] * 3
    assert [s.reward for s in scores] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert scores == [score_mcq(t, e.answer, e.letters, e.reward_rule) for t, e in zip(texts, examples)]
    expected = encode_prompts(tokenizer, [student_conversation(e) for e in questions])
    assert torch.equal(engine.prompts[0].ids, expected.ids) and torch.equal(engine.prompts[0].mask, expected.mask)
    with pytest.raises(ValueError, match="data.max_prompt_tokens"):
        scored_rollouts(engine, tokenizer, questions, SamplingConfig(n=3), PromptConfig(max_prompt_tokens=5))


# ------------------------------------------------------------------------------------ prompt truncation
SHORT = [{"role": "user", "content": "Which letter? A or B."}]
LONG = [{"role": "user", "content": "Which letter is right, given all of the following? " + "It is not C. " * 30}]


def unpadded(prompts: PromptBatch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(prompts.ids, prompts.mask)]


def test_encode_prompts_pads_on_the_left_as_the_tokenizer_does():
    tokenizer = default_tokenizer()
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in (SHORT, LONG)]
    expected = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompts = encode_prompts(tokenizer, [SHORT, LONG])
    assert torch.equal(prompts.ids, expected["input_ids"]) and torch.equal(prompts.mask, expected["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_prompts_cuts_longer_prompts_on_the_side_asked(side):
    """The reference's teacher prompts: right truncation keeps the first ``max_tokens`` tokens (the end, generation
    prompt included, is lost); left keeps the last. Prompts within the limit are left whole."""
    tokenizer = default_tokenizer()
    short, long = unpadded(encode_prompts(tokenizer, [SHORT, LONG]))
    limit = len(short) + 5
    assert len(long) > limit
    prompts = encode_prompts(tokenizer, [SHORT, LONG], max_tokens=limit, truncation=side)
    assert prompts.ids.shape == (2, limit)
    assert unpadded(prompts) == [short, long[:limit] if side == "right" else long[-limit:]]
    assert prompts.mask[0].tolist() == [0] * 5 + [1] * len(short)  # still left-padded


def test_encode_prompts_refuses_a_longer_prompt_by_default():
    tokenizer = default_tokenizer()
    short, long = unpadded(encode_prompts(tokenizer, [SHORT, LONG]))
    with pytest.raises(ValueError, match=f"prompt 1 of the batch has {len(long)} tokens, more than the limit of 40"):
        encode_prompts(tokenizer, [SHORT, LONG], max_tokens=40)
    assert unpadded(encode_prompts(tokenizer, [SHORT, LONG], max_tokens=len(long))) == [short, long]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"truncation": "middle"}, r"truncation='middle' is invalid: one of \('error', 'left', 'right'\) is accepted"),
    ({"max_tokens": 0}, "max_tokens=0 is invalid: None or an integer >= 1 is accepted"),
])
def test_encode_prompts_names_a_bad_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_prompts(default_tokenizer(), [SHORT], **kwargs)
