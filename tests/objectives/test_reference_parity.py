"""Parity with the SDPO reference release (lasgroup/SDPO, verl), in float64.

The functions named ``reference_*`` transcribe what the reference computes, read from its
``core_algos.py`` (``compute_self_distillation_loss``, ``compute_policy_loss_vanilla``, ``agg_loss``),
``rollout_corr_helper.py`` (token-level truncated importance sampling) and ``dp_actor.py`` (micro-batches of one
sequence, each aggregated on its own and scaled by 1 / gradient accumulation). They loop over sequences
the way the reference's training loop does, so they share no code path with the library, which weights
all tokens of a step at once.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from demopsd.config.objectives import DistillationConfig
from demopsd.objectives import aggregation_weights, distillation_loss, grpo_advantages, grpo_loss, token_losses


def reference_support(log_probs: torch.Tensor, index: torch.Tensor | None, add_tail: bool) -> torch.Tensor:
    """The reference's distillation log-probs of one position set: top-k gathered, then tail or renormalised."""
    if index is None:
        return log_probs
    top = log_probs.gather(-1, index)
    if not add_tail:
        return top - torch.logsumexp(top, dim=-1, keepdim=True)
    log_mass = torch.clamp(torch.logsumexp(top, dim=-1, keepdim=True), max=-1e-7)
    return torch.cat([top, torch.log(-torch.expm1(log_mass))], dim=-1)


def reference_token_loss(student_logits, teacher_logits, top_k, add_tail, alpha):
    """``compute_self_distillation_loss``'s per-token loss before weighting, ``[T, V]`` logits → ``[T]``."""
    student_all, teacher_all = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    index = None if top_k is None else torch.topk(student_logits.detach(), top_k, dim=-1).indices
    s = reference_support(student_all, index, add_tail)
    t = reference_support(teacher_all, index, add_tail)
    if alpha == 0.0:
        per_entry = F.kl_div(s, t, reduction="none", log_target=True)
    elif alpha == 1.0:
        per_entry = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        a = torch.tensor(alpha, dtype=s.dtype)
        mixture = torch.logsumexp(torch.stack([s + torch.log(1 - a), t + torch.log(a)]), dim=0)
        towards_teacher = F.kl_div(mixture, t, reduction="none", log_target=True)
        towards_student = F.kl_div(mixture, s, reduction="none", log_target=True)
        per_entry = torch.lerp(towards_student, towards_teacher, a)
    return per_entry.sum(-1)


def reference_token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``agg_loss(..., "token-mean")`` of one micro-batch."""
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def reference_sdpo_step_loss(batch, top_k, add_tail, alpha, is_clip, old_log_probs, sampler_log_probs):
    """The loss the reference back-propagates over one mini-batch: one sequence per micro-batch, each scaled
    by 1 / (sequences in the mini-batch), masked-out sequences (no context) contributing zero."""
    student, teacher, tokens, response_mask, has_context = batch
    accumulation = student.shape[0]
    total = 0.0
    for b in range(accumulation):
        token_log_probs = student[b].log_softmax(-1).gather(-1, tokens[b, :, None])[:, 0]
        per_token = reference_token_loss(student[b], teacher[b], top_k, add_tail, alpha)
        ratio = torch.exp(torch.clamp((token_log_probs - old_log_probs[b]).detach(), -20.0, 20.0)).clamp(max=is_clip)
        per_token = per_token * ratio
        if sampler_log_probs is not None:
            log_ratio = torch.clamp(old_log_probs[b] - sampler_log_probs[b], -20.0, 20.0)
            per_token = per_token * (log_ratio.exp() * response_mask[b]).clamp(max=2.0).detach()
        total = total + reference_token_mean(per_token, response_mask[b] * has_context[b]) / accumulation
    return total


def make_batch(seed: int, scale: float, lengths=(5, 9, 3, 7), has_context=(1, 0, 1, 1), vocab=40):
    """Student/teacher logits ``[B, T, V]`` (float64, student with gradient), right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    student = (scale * torch.randn(len(lengths), width, vocab, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = student.detach() + scale * 0.4 * torch.randn(len(lengths), width, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, vocab, (len(lengths), width), generator=g)
    response_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).double()
    return student, teacher, tokens, response_mask, torch.tensor(has_context, dtype=torch.float64)


def library_sdpo_step_loss(batch, config, old_log_probs):
    student, teacher, tokens, response_mask, has_context = batch
    valid = response_mask.bool()
    weights = aggregation_weights(response_mask * has_context[:, None], config.aggregation)[valid]
    loss, _ = distillation_loss(
        student[valid], teacher[valid], tokens[valid], weights, config,
        old_log_probs=None if old_log_probs is None else old_log_probs[valid],
    )
    return loss


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k, tail", [(20, True), (20, False), (None, False)])
@pytest.mark.parametrize("scale", [1.0, 12.0], ids=["random", "peaked"])
def test_sdpo_loss_and_gradient_equal_the_reference(alpha, top_k, tail, scale):
    """Per-step loss and gradient of ``method=sdpo`` against the reference loop; peaked logits (scale 12) are
    where a floor under the log-probs used to change the loss by up to 60 %."""
    batch = make_batch(seed=int(scale) * 7 + int(alpha * 10), scale=scale)
    student = batch[0]
    token_log_probs = student.detach().log_softmax(-1).gather(-1, batch[2][..., None])[..., 0]
    sampler = token_log_probs + 0.6 * torch.randn(token_log_probs.shape, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64)
    config = DistillationConfig(top_k=top_k, tail_bucket=tail, alpha=alpha, blend="constant", lambda_max=1.0,
                                is_clip=2.0, aggregation="seq-mean-token-mean-all")
    ours = library_sdpo_step_loss(batch, config, sampler)
    # ours applies is_clip to π_θ / π_sampler in one weight; the reference multiplies its on-policy ratio
    # (π_θ / π_old with π_old the detached current values: 1) by the truncated sampler weight (threshold 2)
    reference = reference_sdpo_step_loss(batch, top_k, tail, alpha, 2.0, token_log_probs, sampler)
    assert float(reference.detach()) > 0
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=0)
    g_ours, = torch.autograd.grad(ours, student)
    g_reference, = torch.autograd.grad(reference, student)
    torch.testing.assert_close(g_ours, g_reference, rtol=1e-7, atol=1e-12)


def test_per_token_loss_has_no_floor_on_confident_tokens():
    """A token the student is sure of (top-1 probability ~1 - 1e-12) keeps the reference's exact loss."""
    logits = torch.zeros(1, 30, dtype=torch.float64)
    logits[0, 0] = 30.0
    teacher = logits.clone()
    teacher[0, 1] = 26.0
    config = DistillationConfig(top_k=5, tail_bucket=True, alpha=0.5, blend="constant", is_clip=None)
    losses, stats = token_losses(logits.requires_grad_(), teacher, torch.tensor([0]), config)
    reference = reference_token_loss(logits.detach(), teacher, 5, True, 0.5)
    torch.testing.assert_close(losses.detach(), reference, rtol=1e-9, atol=0)
    assert float(losses) > 1e-3  # a floor at log 1e-8 would have flattened both distributions' small entries


@pytest.mark.parametrize("lengths, has_context", [((5, 9, 3, 7), (1, 0, 1, 1)), ((2, 2, 8), (0, 0, 1))])
def test_aggregation_weights_each_sequence_equally_counting_masked_ones_as_zero(lengths, has_context):
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).double()
    mask = mask * torch.tensor(has_context, dtype=torch.float64)[:, None]
    weights = aggregation_weights(mask, "seq-mean-token-mean-all")
    for b, (length, context) in enumerate(zip(lengths, has_context)):
        expected = context / (length * len(lengths))
        torch.testing.assert_close(weights[b, :length], torch.full((length,), float(expected), dtype=torch.float64))
        assert (weights[b, length:] == 0).all()
    # unlike a global token-mean, a short and a long sequence weigh the same in total
    assert float(weights.sum()) == pytest.approx(sum(has_context) / len(lengths))


def reference_grpo_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """``compute_grpo_outcome_advantage`` with ``norm_adv_by_std_in_grpo: False``: reward minus its group's mean."""
    return torch.cat([group - group.mean() for group in rewards.split(n)])


def reference_grpo_step_loss(log_probs, old, sampler, advantages, mask, clip_low, clip_high, clip_c, threshold):
    """``compute_policy_loss_vanilla`` with the token-level truncated sampler weight, one sequence per micro-batch."""
    total = 0.0
    for b in range(log_probs.shape[0]):
        ratio = torch.exp(torch.clamp(log_probs[b] - old[b], -20.0, 20.0))
        a = advantages[b]
        unclipped, clipped = -a * ratio, -a * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        pessimistic = torch.maximum(unclipped, clipped)
        dual = torch.min(-a * clip_c, pessimistic)
        per_token = torch.where(a < 0, dual, pessimistic)
        weight = (torch.exp(torch.clamp(old[b] - sampler[b], -20.0, 20.0)) * mask[b]).clamp(max=threshold).detach()
        total = total + reference_token_mean(per_token * weight, mask[b]) / log_probs.shape[0]
    return total


@pytest.mark.parametrize("off_policy", [False, True])
def test_grpo_loss_and_gradient_equal_the_reference_baseline(off_policy):
    """``baseline_grpo.yaml``: no std normalisation, clip 0.2 / 0.28, dual clip 3, truncated sampler weight 2.
    Off-policy (old log-probs away from the current ones) every clip and the dual clip take effect."""
    g = torch.Generator().manual_seed(3)
    lengths, n = (4, 6, 2, 5, 3, 6, 6, 1), 4
    mask = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).double()
    log_probs = (-torch.rand(8, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = log_probs.detach() + (torch.randn(8, 6, generator=g, dtype=torch.float64) * 0.8 if off_policy else 0.0)
    sampler = old + 0.7 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    advantages = grpo_advantages(rewards, n)
    torch.testing.assert_close(advantages, reference_grpo_advantages(rewards, n))
    valid = mask.bool()
    token_advantages = advantages[:, None].expand_as(mask)
    ours, metrics = grpo_loss(
        log_probs[valid], token_advantages[valid], aggregation_weights(mask, "seq-mean-token-mean-all")[valid],
        old_log_probs=old[valid] if off_policy else None, sampler_log_probs=sampler[valid],
    )
    reference = reference_grpo_step_loss(log_probs, old, sampler, token_advantages, mask, 0.2, 0.28, 3.0, 2.0)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-15)
    g_ours, = torch.autograd.grad(ours, log_probs)
    g_reference, = torch.autograd.grad(reference, log_probs)
    torch.testing.assert_close(g_ours, g_reference, rtol=1e-12, atol=1e-15)
    if off_policy:  # the dual clip is reached somewhere, else this test would not pin it
        ratio = (log_probs.detach() - old).exp()
        assert ((ratio > 3.0) & (token_advantages < 0) & valid).any()
        assert 0 < float(metrics["clip_fraction"]) < 1


def test_grpo_dual_clip_caps_the_loss_of_a_negative_advantage_at_c_times_the_advantage():
    log_probs = torch.tensor([math.log(10.0)], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, dtype=torch.float64)  # ratio 10
    advantage, weights = torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    capped, _ = grpo_loss(log_probs, advantage, weights, old_log_probs=old, clip_ratio_c=3.0)
    uncapped, _ = grpo_loss(log_probs, advantage, weights, old_log_probs=old, clip_ratio_c=None)
    assert float(capped) == pytest.approx(3.0) and float(uncapped) == pytest.approx(10.0)
    assert float(torch.autograd.grad(capped, log_probs)[0]) == 0.0  # a capped token pushes no gradient
