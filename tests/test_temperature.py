"""The trainer scores the distribution the rollouts were sampled from: at rollout temperature T the student's loss,
the teacher's distribution and GRPO's log-probabilities come from ``logits / T`` (as the reference's actor divides
its logits by the rollout temperature), checked against an independent float64 computation. Each check also
asserts that the untempered distribution gives a clearly different value, so that a trainer which forgot the
temperature (for the student, the teacher, or GRPO) fails here."""

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
