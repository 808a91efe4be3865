"""The full per-method loss: limits (λ ≡ 1, λ ≡ 0, reverse-KL gradient), masks, chunked == straightforward."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from demopsd.config.objectives import DistillationConfig
from demopsd.objectives import chunked_distillation_loss, distillation_loss, kl, support_log_probs


def problem(seed: int, n: int = 12, vocab: int = 30, hidden: int = 6, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, hidden, generator=g) * scale
    teacher_hidden = student_hidden + 0.5 * torch.randn(n, hidden, generator=g)
    head = torch.randn(vocab, hidden, generator=g)
    teacher_head = head + 0.1 * torch.randn(vocab, hidden, generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    weights[:3] = 0.0
    return student_hidden, head, teacher_hidden, teacher_head, tokens, weights / weights.sum()


def test_lambda_one_with_reverse_kl_is_opsd():
    sh, head, th, t_head, tokens, weights = problem(1)
    student_logits = (sh @ head.T).requires_grad_()
    teacher_logits = th @ t_head.T
    config = DistillationConfig(top_k=None, tail_bucket=False, blend="constant", alpha=1.0, is_clip=None)
    ours, metrics = distillation_loss(student_logits, teacher_logits, tokens, weights, config)
    s, t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    reference = (weights * kl(s, t)).sum()
    assert float(metrics["lambda_mean"]) == 1.0
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_lambda_zero_gives_zero_gradient(alpha):
    sh, head, th, t_head, tokens, weights = problem(2)
    student_logits = (sh @ head.T).requires_grad_()
    config = DistillationConfig(top_k=10, alpha=alpha, lambda_max=0.0)
    loss, metrics = distillation_loss(student_logits, th @ t_head.T, tokens, weights, config)
    grad, = torch.autograd.grad(loss, student_logits)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-12, rtol=0)
    assert float(metrics["kl_target_student"]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("top_k, tail", [(None, False), (6, True), (6, False)])
def test_reverse_kl_gradient_is_lambda_times_the_gradient_of_kl_to_the_teacher(top_k, tail):
    sh, head, th, t_head, tokens, weights = problem(3)
    student_logits = (sh @ head.T).requires_grad_()
    teacher_logits = th @ t_head.T
    config = DistillationConfig(top_k=top_k, tail_bucket=tail, alpha=1.0, blend="exp", temperature=0.3, is_clip=None)
    loss, _ = distillation_loss(student_logits, teacher_logits, tokens, weights, config)
    from demopsd.objectives import token_losses

    _, stats = token_losses(student_logits, teacher_logits, tokens, config)
    lam = stats["lambda"]
    assert 0.05 < float(lam.min()) and float(lam.max()) < 0.999  # a genuine per-token blend
    s, t = support_log_probs(
        student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), top_k, tail
    )
    reference = (weights * lam * kl(s, t)).sum()
    torch.testing.assert_close(
        torch.autograd.grad(loss, student_logits)[0], torch.autograd.grad(reference, student_logits)[0],
        rtol=1e-9, atol=1e-13,
    )


def test_masked_positions_contribute_nothing():
    sh, head, th, t_head, tokens, weights = problem(4)
    config = DistillationConfig(top_k=5)
    student_logits = (sh @ head.T).requires_grad_()
    loss, metrics = distillation_loss(student_logits, th @ t_head.T, tokens, weights, config)
    grad, = torch.autograd.grad(loss, student_logits)
    assert (grad[:3] == 0).all() and (grad[3:].abs().sum(-1) > 0).all()

    changed_logits = (sh @ head.T).clone()
    changed_logits[:3] = 50 * torch.randn(3, 30)
    changed_teacher = (th @ t_head.T).clone()
    changed_teacher[:3] = -changed_teacher[:3]
    loss2, metrics2 = distillation_loss(changed_logits, changed_teacher, tokens, weights, config)
    torch.testing.assert_close(loss2, loss.detach())
    for name in ("lambda_mean", "discrepancy_mean", "kl_teacher_student", "kl_target_student"):
        torch.testing.assert_close(metrics2[name], metrics[name])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(1, 40),
    vocab=st.integers(2, 60),
    top_k=st.one_of(st.none(), st.integers(1, 70)),
    tail=st.booleans(),
    alpha=st.sampled_from([0.0, 0.3, 1.0]),
    blend=st.sampled_from(["exp", "linear", "sigmoid", "constant"]),
    chunk=st.integers(1, 17),
)
def test_chunked_path_matches_the_straightforward_one(seed, n, vocab, top_k, tail, alpha, blend, chunk):
    g = torch.Generator().manual_seed(seed)
    hidden = 5
    sh = torch.randn(n, hidden, generator=g, requires_grad=True)
    head = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    th, t_head = torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.rand(n, generator=g) * (torch.rand(n, generator=g) > 0.2)
    old = torch.randn(n, generator=g) - 3
    config = DistillationConfig(top_k=top_k, tail_bucket=tail, alpha=alpha, blend=blend, temperature=0.2)
    kwargs = dict(old_log_probs=old, lambda_max=0.9, discrepancy_scale=0.5)

    plain, plain_metrics = distillation_loss(sh @ head.T, th @ t_head.T, tokens, weights, config, **kwargs)
    plain_grads = torch.autograd.grad(plain, (sh, head))
    fused, fused_metrics = chunked_distillation_loss(sh, head, th, t_head, tokens, weights, config, chunk_size=chunk, **kwargs)
    fused_grads = torch.autograd.grad(fused, (sh, head))

    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for name, value in plain_metrics.items():
        torch.testing.assert_close(fused_metrics[name], value, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_chunked_path_in_float32_matches_a_float64_reference():
    sh, head, th, t_head, tokens, weights = problem(5, n=64, vocab=500, hidden=16)
    config = DistillationConfig(top_k=20)
    ref, _ = distillation_loss(sh @ head.T, th @ t_head.T, tokens, weights, config)
    sh32, head32 = sh.float().requires_grad_(), head.float().requires_grad_()
    loss32, _ = chunked_distillation_loss(sh32, head32, th.float(), t_head.float(), tokens, weights.float(), config,
                                          chunk_size=10)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), ref, rtol=1e-5, atol=1e-7)
    loss32.backward()
    assert torch.isfinite(sh32.grad).all() and torch.isfinite(head32.grad).all()


def test_gradient_is_scaled_by_the_upstream_gradient():
    sh, head, th, t_head, tokens, weights = problem(6)
    sh.requires_grad_()
    loss, _ = chunked_distillation_loss(sh, head, th, t_head, tokens, weights, DistillationConfig(), chunk_size=4)
    g1, = torch.autograd.grad(loss, sh, retain_graph=True)
    g3, = torch.autograd.grad(3.0 * loss, sh)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_peaked_tokens_with_teacher_equal_to_student_give_finite_gradients():
    """Masked rows carry the student's own states as teacher; a peaked token there must not poison the
    gradient with 0 · NaN (what a -inf tail bucket did)."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, dtype=torch.float32)
    hidden[0] *= 60.0  # one token whose top-k hold all the mass in float32
    hidden.requires_grad_()
    head = torch.randn(40, 8, dtype=torch.float32, requires_grad=True)
    tokens = torch.randint(0, 40, (6,))
    for weight in (0.0, 1.0 / 6):
        hidden.grad = head.grad = None
        loss, _ = chunked_distillation_loss(
            hidden, head, hidden.detach(), head.detach(), tokens, torch.full((6,), weight),
            DistillationConfig(top_k=5), chunk_size=4,
        )
        loss.backward()
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.grad).all()
