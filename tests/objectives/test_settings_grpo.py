"""Validation messages, λ schedule, discrepancy normaliser, aggregation weights and the GRPO loss."""

import math

import pytest
import torch

from demopsd.config.objectives import DistillationConfig, GRPOConfig
from demopsd.objectives import (
    DiscrepancyNormalizer,
    aggregation_weights,
    blend_weight,
    chunked_token_log_probs,
    discrepancy,
    divergence,
    grpo_advantages,
    grpo_loss,
    lambda_max_at,
)


@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("top_k", 0, "a positive integer, or null"),
        ("top_k", -5, "a positive integer, or null"),
        ("alpha", 1.5, r"a value in \[0, 1\]"),
        ("alpha", -0.1, r"a value in \[0, 1\]"),
        ("lambda_max", 1.2, r"a value in \[0, 1\]"),
        ("is_clip", 0.5, "null \\(off\\) or a value >= 1"),
        ("discrepancy", "hellinger", "one of \\('jsd', 'kl_ts', 'kl_st', 'tv'\\)"),
        ("blend", "cosine", "one of \\('exp', 'linear', 'sigmoid', 'constant'\\)"),
        ("aggregation", "sum", "one of \\('seq-mean-token-mean-all', 'token-mean'"),
        ("temperature", 0.0, "a positive value"),
    ],
)
def test_invalid_distillation_settings_name_the_value_and_what_is_accepted(field, value, accepted):
    with pytest.raises(ValueError, match=rf"^method.objective.{field}={value!r} is invalid: {accepted}"):
        DistillationConfig(**{field: value})


def test_invalid_values_are_refused_by_the_functions_too():
    p = torch.tensor([0.5, 0.5]).log()
    with pytest.raises(ValueError, match=r"alpha=2 is invalid: a value in \[0, 1\]"):
        divergence(p, p, 2)
    with pytest.raises(ValueError, match="discrepancy='l1' is invalid"):
        discrepancy(p, p, "l1")
    with pytest.raises(ValueError, match="blend='step' is invalid"):
        blend_weight(torch.zeros(1), "step", 1.0, 1.0)
    with pytest.raises(ValueError, match="clip_low=1.0 is invalid"):
        GRPOConfig(clip_low=1.0)


def test_lambda_max_schedule_warms_up_then_decays():
    config = DistillationConfig(lambda_max=0.8, lambda_warmup_steps=4, lambda_decay_steps=10, lambda_final=0.3)
    values = [lambda_max_at(config, s) for s in (0, 2, 4, 9, 14, 100)]
    assert values == pytest.approx([0.0, 0.4, 0.8, 0.55, 0.3, 0.3])
    assert lambda_max_at(DistillationConfig(lambda_max=0.7), 123) == 0.7


def test_discrepancy_normaliser_is_an_ema_and_round_trips():
    normaliser = DiscrepancyNormalizer(0.9)
    assert normaliser.scale is None
    normaliser.update(1.0)
    normaliser.update(2.0)
    assert normaliser.scale == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    restored = DiscrepancyNormalizer(0.5)
    restored.load_state_dict(normaliser.state_dict())
    assert (restored.momentum, restored.scale) == (0.9, normaliser.scale)


def test_aggregation_weights_closed_forms():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    losses = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [99.0] * 4])
    token_mean = (aggregation_weights(mask, "token-mean") * losses).sum()
    seq_sum = (aggregation_weights(mask, "seq-mean-token-sum") * losses).sum()
    seq_mean = (aggregation_weights(mask, "seq-mean-token-mean") * losses).sum()
    assert float(token_mean) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(seq_sum) == pytest.approx((6 + 4) / 2)
    assert float(seq_mean) == pytest.approx((2 + 4) / 2)
    assert (aggregation_weights(torch.zeros(2, 3), "token-mean") == 0).all()


def test_grpo_advantages_with_and_without_std_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    centred = grpo_advantages(rewards, 4, scale_by_std=False)
    torch.testing.assert_close(centred, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    scaled = grpo_advantages(rewards, 4, scale_by_std=True, eps=1e-6)
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std()
    torch.testing.assert_close(scaled[:4], centred[:4] / (std + 1e-6))
    assert (scaled[4:] == 0).all()  # a group that all agrees carries no signal
    with pytest.raises(ValueError, match="group_size=3 is invalid for 8 rewards"):
        grpo_advantages(rewards, 3)


def test_grpo_loss_clips_the_ratio_and_its_on_policy_gradient_is_the_policy_gradient():
    log_probs = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    old = torch.tensor([-1.5, -0.5, -1.0])  # ratios e^0.5, e^-0.5, 1
    advantages = torch.tensor([1.0, -1.0, 2.0])
    weights = torch.full((3,), 1 / 3)
    loss, metrics = grpo_loss(log_probs, advantages, weights, old_log_probs=old, clip_low=0.2, clip_high=0.2)
    expected = -(1.2 * 1.0 + (-1.0) * max(math.exp(-0.5), 0.8) + 2.0) / 3
    assert float(loss.detach()) == pytest.approx(expected)
    assert float(metrics["clip_fraction"]) == pytest.approx(2 / 3)
    grad, = torch.autograd.grad(loss, log_probs)
    # clipped tokens get no gradient; the unclipped one gets -w·A·ratio
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -2.0 / 3]))

    on_policy = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    loss, _ = grpo_loss(on_policy, advantages, weights)
    grad, = torch.autograd.grad(loss, on_policy)
    torch.testing.assert_close(grad, -advantages * weights)


def test_grpo_sampler_weight_is_truncated_and_off_when_the_trainer_sampled():
    log_probs = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    sampler = torch.tensor([-1.0, -2.0, -0.5])  # weights 1, e (truncated to 2), e^-0.5
    advantages, weights = torch.tensor([1.0, 1.0, 1.0]), torch.full((3,), 1 / 3)
    loss, metrics = grpo_loss(log_probs, advantages, weights, sampler_log_probs=sampler)
    grad, = torch.autograd.grad(loss, log_probs)
    torch.testing.assert_close(grad, -torch.tensor([1.0, 2.0, math.exp(-0.5)]) / 3)
    assert float(metrics["sampler_weight_mean"]) == pytest.approx((1 + 2 + math.exp(-0.5)) / 3)
    for sampler_log_probs, threshold in ((None, 2.0), (sampler, None)):
        loss, _ = grpo_loss(log_probs, advantages, weights, sampler_log_probs=sampler_log_probs,
                            rollout_is_threshold=threshold)
        torch.testing.assert_close(torch.autograd.grad(loss, log_probs)[0], -advantages * weights)


def test_chunked_token_log_probs_match_the_full_softmax_with_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 7, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(40, 7, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 40, (23,), generator=g)
    log_probs, entropy = chunked_token_log_probs(hidden, head, tokens, chunk_size=5)
    full = (hidden @ head.T).log_softmax(-1)
    torch.testing.assert_close(log_probs, full.gather(-1, tokens[:, None])[:, 0])
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach())
    assert not entropy.requires_grad
    weights = torch.rand(23, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((weights * log_probs).sum(), (hidden, head))
    reference = torch.autograd.grad((weights * full.gather(-1, tokens[:, None])[:, 0]).sum(), (hidden, head))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)
