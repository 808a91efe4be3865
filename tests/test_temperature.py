"""The trainer scores the distribution the rollouts were sampled from: at rollout temperature T the student's loss,
the teacher's distribution and GRPO's log-probabilities come from ``logits / T`` (as the reference's actor divides
its logits by the rollout temperature), checked against an independent float64 computation. Each check also
asserts that the untempered distribution gives a clearly different value, so that a trainer which forgot the
temperature (for the student, the teacher, or GRPO) fails here. The first tests check the objectives on tempered
states; the last two run :class:`DistillationStep` and :class:`GRPOStep` themselves (``begin``, ``micro_batch_loss``,
``end``) on a tiny random model and compare with the same model in float64."""

import pytest
import torch

from demopsd.config.objectives import DistillationConfig
from demopsd.objectives import chunked_distillation_loss, chunked_token_log_probs
from demopsd.training.steps import tempered

T = 0.6  # the reference's evaluation temperature; any T != 1 will do
N, H, V = 7, 16, 40  # response tokens, hidden size, vocabulary


def states(seed: int = 0) -> dict[str, torch.Tensor]:
    """Student and teacher hidden states ``[N, H]``, their heads ``[V, H]``, sampled tokens and token weights."""
    g = torch.Generator().manual_seed(seed)
    return {
        "student_hidden": torch.randn(N, H, generator=g),
        "student_head": torch.randn(V, H, generator=g),
        "teacher_hidden": torch.randn(N, H, generator=g),
        "teacher_head": torch.randn(V, H, generator=g),
        "tokens": torch.randint(V, (N,), generator=g),
        "token_weights": torch.rand(N, generator=g) + 0.1,
    }


def log_softmax64(hidden: torch.Tensor, head: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(hidden @ head.T / temperature)`` in float64."""
    return ((hidden.double() @ head.double().T) / temperature).log_softmax(-1)


def reference_jsd_loss(s: dict, student_t: float, teacher_t: float, top_k: int | None) -> torch.Tensor:
    """SDPO's loss (target = the teacher, generalised JSD with α = 0.5) written out in float64: on the student's
    top-k tokens plus one tail bucket (``log(1 - Σ top-k)``), or on the full vocabulary; ``Σ_t w_t ℓ_t``."""
    log_s = log_softmax64(s["student_hidden"], s["student_head"], student_t)
    log_t = log_softmax64(s["teacher_hidden"], s["teacher_head"], teacher_t)
    if top_k is not None:
        support = log_s.topk(top_k, dim=-1).indices
        log_s, log_t = log_s.gather(-1, support), log_t.gather(-1, support)
        log_s = torch.cat([log_s, torch.log1p(-log_s.exp().sum(-1, keepdim=True))], -1)
        log_t = torch.cat([log_t, torch.log1p(-log_t.exp().sum(-1, keepdim=True))], -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    log_m = (0.5 * p_s + 0.5 * p_t).log()
    per_token = 0.5 * (p_s * (log_s - log_m)).sum(-1) + 0.5 * (p_t * (log_t - log_m)).sum(-1)
    return (s["token_weights"].double() * per_token).sum()


def test_tempered_states_give_the_logits_divided_by_the_temperature():
    s = states()
    logits = tempered(s["student_hidden"], T) @ s["student_head"].T
    expected = (s["student_hidden"].double() @ s["student_head"].double().T) / T
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    assert tempered(s["student_hidden"], 1.0) is s["student_hidden"]


@pytest.mark.parametrize("top_k", [None, 5], ids=["full-vocabulary", "top5-and-tail"])
def test_the_distillation_loss_scores_student_and_teacher_at_the_rollout_temperature(top_k):
    """The loss and its gradient w.r.t. the student's states, from tempered student and teacher states, equal the
    float64 loss on ``logits / T``; leaving either side untempered moves the loss well beyond the tolerance."""
    s = states()
    config = DistillationConfig(top_k=top_k, tail_bucket=top_k is not None, alpha=0.5, blend="constant",
                                lambda_max=1.0, is_clip=None)
    student_hidden = s["student_hidden"].clone().requires_grad_(True)
    loss, _ = chunked_distillation_loss(
        tempered(student_hidden, T), s["student_head"], tempered(s["teacher_hidden"], T), s["teacher_head"],
        s["tokens"], s["token_weights"], config, chunk_size=3,
    )
    loss.backward()

    reference_hidden = s["student_hidden"].double().requires_grad_(True)
    expected = reference_jsd_loss(s | {"student_hidden": reference_hidden}, T, T, top_k)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(student_hidden.grad.double(), reference_hidden.grad, rtol=1e-3, atol=1e-6)

    for student_t, teacher_t in ((1.0, T), (T, 1.0), (1.0, 1.0)):  # the student, the teacher, or both untempered
        wrong = float(reference_jsd_loss(s, student_t, teacher_t, top_k))
        assert abs(wrong - float(expected.detach())) > 100 * 1e-4 * abs(float(expected.detach()))


def test_grpo_log_probs_and_entropy_are_those_of_the_tempered_distribution():
    s = states()
    hidden = s["student_hidden"].clone().requires_grad_(True)
    log_probs, entropy = chunked_token_log_probs(tempered(hidden, T), s["student_head"], s["tokens"], chunk_size=3)
    log_probs.sum().backward()

    reference_hidden = s["student_hidden"].double().requires_grad_(True)
    full = log_softmax64(reference_hidden, s["student_head"], T)
    expected = full.gather(-1, s["tokens"][:, None]).squeeze(-1)
    expected.sum().backward()
    torch.testing.assert_close(log_probs.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(full.exp() * full).sum(-1).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), reference_hidden.grad, rtol=1e-4, atol=1e-5)

    untempered = log_softmax64(s["student_hidden"], s["student_head"], 1.0).gather(-1, s["tokens"][:, None])
    assert (untempered.squeeze(-1) - expected.detach()).abs().max() > 0.1


# ------------------------------------------------------------------------------------------ through the steps
STEP_SYSTEM = "Answer with the letter."
STEP_PROMPT = "Which is first?\nA: one\nB: two\nPlease reason step by step."
STEP_TEXTS = ["<answer>\nA\n</answer>", "One comes first.\n<answer>\nA\n</answer>"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from demopsd.runtime.models import GGUF_FILE, default_gguf_dir, prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(default_gguf_dir(), gguf_file=GGUF_FILE))


def chat_ids(tokenizer, system: str, user: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_rows(tokenizer) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in STEP_TEXTS]


def step_batch(tokenizer, rewards: list[float]):
    """One question, its two rollouts (``STEP_TEXTS``) sampled at T, scored ``rewards``, as the steps take them."""
    from demopsd.data.rewards import MCQScore
    from demopsd.data.types import MCQExample, student_conversation
    from demopsd.rollout.batch import RolloutBatch, encode_prompts, repeat_prompts
    from demopsd.training.steps import StepBatch

    example = MCQExample(STEP_PROMPT, "A", STEP_SYSTEM, 0, "AB")
    rows = response_rows(tokenizer)
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    prompts = repeat_prompts(encode_prompts(tokenizer, [student_conversation(example)]), 2)
    rollouts = RolloutBatch(prompt=prompts, response_ids=ids, response_mask=mask, texts=list(STEP_TEXTS), seconds=0.0,
                            group_size=2)
    scores = [MCQScore(reward=r, correct=r == 1.0, well_formed=True, predicted="A") for r in rewards]
    return StepBatch(rollouts, [example, example], scores, global_step=0)


def response_log_probs64(model64, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """``[len(response), V]`` float64 log-probabilities of ``model64`` at each response position, at ``temperature``."""
    logits = model64(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return (logits / temperature).log_softmax(-1)


def test_the_distillation_step_scores_student_and_teacher_at_the_rollout_temperature(tokenizer):
    """SDPO's step (live teacher, full vocabulary, JSD) on two successful rollouts, each the other's demonstration:
    its loss equals the float64 loss on ``logits / T`` of the student's and the teacher's prompts, each rollout's
    token-mean averaged over the two; scoring either side untempered would be far off."""
    import copy

    from demopsd.config.settings import RepromptConfig, SamplingConfig
    from demopsd.training.steps import DistillationStep
    from demopsd.training.timing import StepClock
    from tests.helpers import tiny_policy

    policy = tiny_policy(tokenizer)
    config = DistillationConfig(top_k=None, tail_bucket=False, alpha=0.5, blend="constant", lambda_max=1.0,
                                is_clip=None)
    step = DistillationStep(policy, tokenizer, config, SamplingConfig(n=2, temperature=T), RepromptConfig(),
                            teacher_kind="live")
    step.begin(step_batch(tokenizer, [1.0, 1.0]))
    loss = step.micro_batch_loss(range(0, 2), range(0, 2), StepClock())
    step.end()

    model64 = copy.deepcopy(policy).double().eval()
    student_prompt = chat_ids(tokenizer, STEP_SYSTEM, STEP_PROMPT)

    def expected(student_t: float, teacher_t: float) -> float:
        per_rollout = []
        with torch.no_grad():
            for row, response in enumerate(response_rows(tokenizer)):
                demonstration = f"Correct solution:\n\n{STEP_TEXTS[1 - row]}"  # the sibling's, as the reference's
                teacher_user = f"{STEP_PROMPT}\n{demonstration}\n\nCorrectly solve the original question."
                teacher_prompt = chat_ids(tokenizer, STEP_SYSTEM, teacher_user)
                log_s = response_log_probs64(model64, student_prompt, response, student_t)
                log_t = response_log_probs64(model64, teacher_prompt, response, teacher_t)
                log_m = (0.5 * log_s.exp() + 0.5 * log_t.exp()).log()
                jsd = 0.5 * (log_s.exp() * (log_s - log_m)).sum(-1) + 0.5 * (log_t.exp() * (log_t - log_m)).sum(-1)
                per_rollout.append(jsd.mean())
        return float(torch.stack(per_rollout).mean())

    reference = expected(T, T)
    assert float(loss.detach()) == pytest.approx(reference, rel=1e-4)
    for student_t, teacher_t in ((1.0, T), (T, 1.0)):
        assert abs(expected(student_t, teacher_t) - reference) > 0.01 * reference


def test_the_grpo_step_takes_the_gradient_of_the_tempered_log_probs(tokenizer):
    """GRPO's step on a group with rewards 1 and 0 (advantages ±½) at ratio 1: its gradient is that of
    ``-Σ_rollouts A · token-mean(log π_T)`` / 2 in float64 with ``π_T = softmax(logits / T)``, and its entropy
    metric is that of ``π_T``; the untempered gradient is far from it."""
    import copy

    from demopsd.config.objectives import GRPOConfig
    from demopsd.config.settings import SamplingConfig
    from demopsd.training.steps import GRPOStep
    from demopsd.training.timing import StepClock
    from tests.helpers import tiny_policy

    policy = tiny_policy(tokenizer)
    step = GRPOStep(policy, GRPOConfig(), SamplingConfig(n=2, temperature=T))
    step.begin(step_batch(tokenizer, [1.0, 0.0]))
    step.micro_batch_loss(range(0, 2), range(0, 2), StepClock()).backward()
    entropy = step.end()["train/entropy"]
    gradient = policy.get_output_embeddings().weight.grad.double()

    prompt = chat_ids(tokenizer, STEP_SYSTEM, STEP_PROMPT)

    def expected(temperature: float) -> tuple[torch.Tensor, float]:
        model64 = copy.deepcopy(policy).double()
        model64.zero_grad()
        objective, entropies = 0.0, []
        for advantage, response in zip((0.5, -0.5), response_rows(tokenizer)):
            log_probs = response_log_probs64(model64, prompt, response, temperature)
            taken = log_probs.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
            objective = objective - advantage * taken.mean() / 2
            entropies.append(-(log_probs.exp() * log_probs).sum(-1).detach())
        objective.backward()
        return model64.get_output_embeddings().weight.grad, float(torch.cat(entropies).mean())

    reference, reference_entropy = expected(T)
    assert (gradient - reference).norm() < 1e-4 * reference.norm()  # float32 against float64
    assert float(entropy) == pytest.approx(reference_entropy, rel=1e-4)
    untempered, _ = expected(1.0)
    assert (untempered - reference).norm() > 0.05 * reference.norm()
