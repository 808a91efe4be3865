"""Closed forms and limits of the objective pieces, in float64."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from demopsd.objectives import (
    add_tail_bucket,
    barycenter_log_probs,
    blend_weight,
    discrepancy,
    divergence,
    importance_weight,
    kl,
)


def random_log_probs(seed: int, *shape: int, sharpness: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(*shape, generator=g)).log_softmax(-1)


distribution_seeds = st.integers(0, 10**6)
sizes = st.integers(2, 20)


@settings(max_examples=30, deadline=None)
@given(distribution_seeds, sizes, st.floats(0.0, 1.0))
def test_barycenter_minimises_the_weighted_reverse_kls(seed, size, lam):
    log_t, log_s = random_log_probs(seed, size), random_log_probs(seed + 1, size)
    log_q = barycenter_log_probs(log_t, log_s, lam)

    def objective(logits):
        q = torch.tensor(logits).log_softmax(-1)
        return float(lam * kl(q, log_t) + (1 - lam) * kl(q, log_s))

    best = min(
        (minimize(objective, x0, method="BFGS", options={"gtol": 1e-10}) for x0 in (np.zeros(size), log_s.numpy())),
        key=lambda r: r.fun,
    )
    assert objective(log_q.numpy()) <= best.fun + 1e-9
    torch.testing.assert_close(log_q.exp(), torch.tensor(best.x).softmax(-1), atol=2e-4, rtol=0)


def test_barycenter_endpoints_and_per_position_weights():
    log_t, log_s = random_log_probs(0, 3, 7), random_log_probs(1, 3, 7)
    torch.testing.assert_close(barycenter_log_probs(log_t, log_s, 1.0), log_t)
    torch.testing.assert_close(barycenter_log_probs(log_t, log_s, 0.0), log_s)
    lam = torch.tensor([0.0, 0.3, 1.0])
    rows = barycenter_log_probs(log_t, log_s, lam)
    for i in range(3):
        torch.testing.assert_close(rows[i], barycenter_log_probs(log_t[i], log_s[i], float(lam[i])))


@settings(max_examples=40, deadline=None)
@given(distribution_seeds, sizes)
def test_transferred_kl_is_non_decreasing_in_lambda_from_zero_to_full_teacher(seed, size):
    log_t, log_s = random_log_probs(seed, size), random_log_probs(seed + 7, size)
    lams = torch.linspace(0, 1, 41)
    transferred = torch.stack([kl(barycenter_log_probs(log_t, log_s, float(l)), log_s) for l in lams])
    assert transferred[0] == pytest.approx(0.0, abs=1e-12)
    assert transferred[-1] == pytest.approx(float(kl(log_t, log_s)), rel=1e-9, abs=1e-12)
    assert (transferred.diff() >= -1e-12).all()


@settings(max_examples=30, deadline=None)
@given(distribution_seeds, st.integers(1, 30), st.floats(0.0, 0.999999))
def test_tail_bucket_sums_to_one(seed, k, mass):
    g = torch.Generator().manual_seed(seed)
    topk = (torch.rand(k, generator=g) + 1e-3)
    topk = (topk / topk.sum() * mass).log()
    full = add_tail_bucket(topk)
    assert full.shape == (k + 1,)
    assert float(full.exp().sum()) == pytest.approx(1.0, abs=1e-12)


def test_tail_bucket_is_exact_above_the_reference_floor_and_the_floor_below():
    """The reference clamps the top-k log-mass at -1e-7: tails above about 1e-7 are exact, smaller ones read 1e-7."""
    for tail in (1e-3, 1e-6):
        topk = torch.tensor([1 - tail - 0.25, 0.25], dtype=torch.float64).log()
        assert float(add_tail_bucket(topk)[-1]) == pytest.approx(math.log(tail), rel=1e-9)
    for tail in (1e-9, 1e-13, 0.0):
        topk = torch.tensor([1 - tail - 0.25, 0.25], dtype=torch.float64).log()
        assert float(add_tail_bucket(topk)[-1]) == pytest.approx(math.log(-math.expm1(-1e-7)), rel=1e-12)
    # float32 with a top-k mass of exactly 1
    exact = add_tail_bucket(torch.tensor([0.5, 0.5], dtype=torch.float32).log())
    assert float(exact[-1]) == pytest.approx(math.log(1e-7), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tail_bucket_gradient_is_finite_when_the_top_k_hold_all_mass(dtype):
    """A token whose top-k mass rounds to 1 must not turn into a NaN gradient (0 · ∞) after the clamp."""
    logits = torch.full((50,), -200.0, dtype=dtype)
    logits[:3] = torch.tensor([5.0, 1.0, 0.0], dtype=dtype)
    logits.requires_grad_()
    top = logits.log_softmax(-1).topk(10).values
    add_tail_bucket(top).sum().backward()
    assert torch.isfinite(logits.grad).all()


@settings(max_examples=30, deadline=None)
@given(distribution_seeds, sizes)
def test_divergence_family_endpoints_and_jsd_limits(seed, size):
    log_s, log_q = random_log_probs(seed, size), random_log_probs(seed + 3, size)
    forward, reverse = float(kl(log_q, log_s)), float(kl(log_s, log_q))
    assert float(divergence(log_s, log_q, 0.0)) == pytest.approx(forward, rel=1e-12)
    assert float(divergence(log_s, log_q, 1.0)) == pytest.approx(reverse, rel=1e-12)
    # generalised JSD: symmetric at α = 1/2, bounded by ln 2, and α·KL(q‖p_S), (1-α)·KL(p_S‖q) near the ends
    half = float(divergence(log_s, log_q, 0.5))
    assert half == pytest.approx(float(divergence(log_q, log_s, 0.5)), rel=1e-12)
    assert 0 <= half <= math.log(2) + 1e-12
    assert float(divergence(log_s, log_q, 0.3)) == pytest.approx(float(divergence(log_q, log_s, 0.7)), rel=1e-12)
    small = 1e-9
    assert float(divergence(log_s, log_q, small)) / small == pytest.approx(forward, rel=1e-3, abs=1e-6)
    assert float(divergence(log_s, log_q, 1 - small)) / small == pytest.approx(reverse, rel=1e-3, abs=1e-6)


def test_divergences_vanish_on_equal_distributions():
    log_p = random_log_probs(5, 4, 9)
    for alpha in (0.0, 0.25, 0.5, 1.0):
        torch.testing.assert_close(divergence(log_p, log_p, alpha), torch.zeros(4), atol=1e-12, rtol=0)
    for kind in ("jsd", "kl_ts", "kl_st", "tv"):
        torch.testing.assert_close(discrepancy(log_p, log_p, kind), torch.zeros(4), atol=1e-12, rtol=0)


def test_discrepancy_closed_forms_on_disjoint_and_two_point_distributions():
    eps = 1e-30
    p = torch.tensor([1 - eps, eps]).log()
    q = torch.tensor([eps, 1 - eps]).log()
    assert float(discrepancy(p, q, "jsd")) == pytest.approx(math.log(2), rel=1e-9)
    assert float(discrepancy(p, q, "tv")) == pytest.approx(1.0, rel=1e-9)
    a, b = torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])
    assert float(discrepancy(a.log(), b.log(), "kl_ts")) == pytest.approx(0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4))
    assert float(discrepancy(a.log(), b.log(), "kl_st")) == pytest.approx(0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8))
    assert float(discrepancy(a.log(), b.log(), "tv")) == pytest.approx(0.4)


def test_blend_rules_are_non_increasing_and_match_their_formulas():
    d = torch.linspace(0, 2, 201)
    for rule in ("exp", "linear", "sigmoid", "constant"):
        lam = blend_weight(d, rule, lambda_max=0.8, temperature=0.5, sigmoid_center=0.3)
        assert (lam.diff() <= 1e-15).all() and (lam >= 0).all() and (lam <= 0.8).all()
    torch.testing.assert_close(blend_weight(d, "exp", 0.8, 0.5), 0.8 * torch.exp(-d / 0.5))
    torch.testing.assert_close(blend_weight(d, "linear", 1.0, 0.5), (1 - d / 0.5).clamp(0, 1))
    torch.testing.assert_close(blend_weight(torch.tensor([0.3]), "sigmoid", 1.0, 0.5, 0.3), torch.tensor([0.5]))
    torch.testing.assert_close(blend_weight(d, "constant", 0.8, 0.5), torch.full_like(d, 0.8))


def test_importance_weight_clips_and_carries_no_gradient():
    log_probs = torch.tensor([-1.0, -1.0, -1.0, -1.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.5, -0.5, -100.0])
    weight, clipped = importance_weight(log_probs, old, is_clip=2.0)
    torch.testing.assert_close(weight, torch.tensor([1.0, math.exp(0.5), math.exp(-0.5), 2.0]))
    assert clipped.tolist() == [False, False, False, True]
    assert not weight.requires_grad
    on_policy, _ = importance_weight(log_probs, None, is_clip=2.0)
    torch.testing.assert_close(on_policy, torch.ones(4))
    off, _ = importance_weight(log_probs, old, is_clip=None)
    torch.testing.assert_close(off, torch.ones(4))
    huge, _ = importance_weight(torch.tensor([0.0]), torch.tensor([-1e4]), is_clip=1e30)
    assert float(huge) == pytest.approx(math.exp(20))
