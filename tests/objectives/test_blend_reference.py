"""An independent float64 reference for DemoPSD's blended path, written from the design (not the library).

Everything here is plain numpy with explicit loops over positions; the library's :func:`token_losses`
(losses and every statistic), its gradient, :func:`lambda_max_at` and :class:`DiscrepancyNormalizer`
are compared against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from demopsd.config.objectives import DistillationConfig
from demopsd.objectives import DiscrepancyNormalizer, lambda_max_at, token_losses

N, V, K = 12, 50, 8


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: with intra-op threads on a busy machine each op can wait ~10 ms at a barrier."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
TAIL_LOG_MASS_CAP = -1e-7  # the SDPO reference clamps the top-k log-mass at -1e-7 before log(-expm1(.))
IS_LOG_RATIO_CLAMP = 20.0
VALUE_TOL = dict(rtol=1e-9, atol=1e-12)

DISCREPANCY_KINDS = ("jsd", "kl_ts", "kl_st", "tv")
BLEND_RULES = ("exp", "linear", "sigmoid", "constant")
ALPHAS = (0.0, 0.3, 0.5, 1.0)
SUPPORTS = ((None, True), (None, False), (K, True), (K, False))  # (top_k, tail_bucket)


# ----------------------------------------------------------------------------------------------------
# The reference: one position at a time, numpy only.


def ref_logsumexp(v: np.ndarray) -> float:
    top = float(np.max(v))
    return top + math.log(float(np.sum(np.exp(v - top))))


def ref_log_softmax(z: np.ndarray) -> np.ndarray:
    return z - ref_logsumexp(z)


def ref_kl(log_p: np.ndarray, log_q: np.ndarray) -> float:
    return float(np.dot(np.exp(log_p), log_p - log_q))


def ref_support_indices(student_row: np.ndarray, top_k: int | None) -> np.ndarray | None:
    """The student's k most likely tokens (a set: the order does not matter), None for the full vocabulary."""
    if top_k is None or top_k >= student_row.shape[0]:
        return None
    return np.sort(np.argsort(-student_row, kind="stable")[:top_k])


def ref_tail(topk: np.ndarray) -> float:
    mass = min(ref_logsumexp(topk), TAIL_LOG_MASS_CAP)
    return math.log(-math.expm1(mass))


def ref_on_support(full_row: np.ndarray, index: np.ndarray | None, tail_bucket: bool) -> np.ndarray:
    if index is None:
        return full_row.copy()
    picked = np.array([full_row[j] for j in index])
    if tail_bucket:
        return np.append(picked, ref_tail(picked))
    return picked - ref_logsumexp(picked)


def ref_discrepancy(t: np.ndarray, s: np.ndarray, kind: str) -> float:
    pt, ps = np.exp(t), np.exp(s)
    if kind == "jsd":
        log_m = np.log(0.5 * pt + 0.5 * ps)
        return 0.5 * ref_kl(t, log_m) + 0.5 * ref_kl(s, log_m)
    if kind == "kl_ts":
        return ref_kl(t, s)
    if kind == "kl_st":
        return ref_kl(s, t)
    if kind == "tv":
        return 0.5 * float(np.sum(np.abs(pt - ps)))
    raise AssertionError(kind)


def ref_blend(d_scaled: float, rule: str, lambda_max: float, tau: float, center: float) -> float:
    if rule == "exp":
        shape = math.exp(-d_scaled / tau)
    elif rule == "linear":
        shape = min(1.0, max(0.0, 1.0 - d_scaled / tau))
    elif rule == "sigmoid":
        shape = 1.0 / (1.0 + math.exp(-(center - d_scaled) / tau))
    elif rule == "constant":
        shape = 1.0
    else:
        raise AssertionError(rule)
    return lambda_max * shape


def ref_barycenter(t: np.ndarray, s: np.ndarray, lam: float) -> np.ndarray:
    unnormalised = lam * t + (1.0 - lam) * s
    return unnormalised - ref_logsumexp(unnormalised)


def ref_divergence(s: np.ndarray, q: np.ndarray, alpha: float) -> float:
    if alpha == 0.0:
        return ref_kl(q, s)
    if alpha == 1.0:
        return ref_kl(s, q)
    log_mix = np.log((1.0 - alpha) * np.exp(s) + alpha * np.exp(q))
    return alpha * ref_kl(q, log_mix) + (1.0 - alpha) * ref_kl(s, log_mix)


def ref_is_weight(token_log_prob: float, old: float | None, is_clip: float | None) -> tuple[float, bool]:
    if old is None or is_clip is None:
        return 1.0, False
    ratio = math.exp(min(IS_LOG_RATIO_CLAMP, max(-IS_LOG_RATIO_CLAMP, token_log_prob - old)))
    return min(ratio, is_clip), ratio > is_clip


@dataclass
class Settings:
    top_k: int | None
    tail_bucket: bool
    discrepancy: str
    blend: str
    alpha: float
    temperature: float
    sigmoid_center: float
    lambda_max: float  # the effective λ_max (argument, else config)
    scale: float | None
    is_clip: float | None


@dataclass
class PositionReference:
    index: np.ndarray | None  # the support (stop-gradient)
    lam: float
    target: np.ndarray  # log q on the support (stop-gradient)
    weight: float  # importance weight (stop-gradient)
    clipped: bool
    loss: float
    discrepancy: float
    kl_teacher_student: float
    kl_target_student: float
    entropy: float


def ref_discrepancies(student_logits: np.ndarray, teacher_logits: np.ndarray, st: Settings) -> np.ndarray:
    """The unscaled D per position (used to choose a temperature that keeps λ inside (0, 1))."""
    out = []
    for z_s, z_t in zip(student_logits, teacher_logits):
        s_full, t_full = ref_log_softmax(z_s), ref_log_softmax(z_t)
        index = ref_support_indices(s_full, st.top_k)
        s, t = ref_on_support(s_full, index, st.tail_bucket), ref_on_support(t_full, index, st.tail_bucket)
        out.append(ref_discrepancy(t, s, st.discrepancy))
    return np.array(out)


def ref_token_losses(student_logits, teacher_logits, tokens, old_log_probs, st: Settings) -> list[PositionReference]:
    positions = []
    for i in range(student_logits.shape[0]):
        s_full = ref_log_softmax(student_logits[i])
        t_full = ref_log_softmax(teacher_logits[i])
        index = ref_support_indices(s_full, st.top_k)
        s = ref_on_support(s_full, index, st.tail_bucket)
        t = ref_on_support(t_full, index, st.tail_bucket)
        d = ref_discrepancy(t, s, st.discrepancy)
        d_scaled = d if st.scale is None else d / st.scale
        lam = ref_blend(d_scaled, st.blend, st.lambda_max, st.temperature, st.sigmoid_center)
        q = ref_barycenter(t, s, lam)
        old = None if old_log_probs is None else float(old_log_probs[i])
        w, clipped = ref_is_weight(float(s_full[int(tokens[i])]), old, st.is_clip)
        positions.append(PositionReference(
            index=index, lam=lam, target=q, weight=w, clipped=clipped,
            loss=ref_divergence(s, q, st.alpha) * w,
            discrepancy=d,
            kl_teacher_student=ref_kl(t, s),
            kl_target_student=ref_kl(q, s),
            entropy=-float(np.sum(np.exp(s_full) * s_full)),
        ))
    return positions


def ref_row_loss(z_row: np.ndarray, fixed: PositionReference, st: Settings) -> float:
    """One position's loss as a function of its student logits, the stop-gradient parts held fixed."""
    s = ref_on_support(ref_log_softmax(z_row), fixed.index, st.tail_bucket)
    return ref_divergence(s, fixed.target, st.alpha) * fixed.weight


def choose_temperature(d_scaled: np.ndarray, blend: str) -> tuple[float, float]:
    """(τ, sigmoid_center) from the reference's D' so that λ/λ_max is inside (0, 1) for most tokens."""
    median = float(np.median(d_scaled))
    if blend == "exp":
        return float(np.max(d_scaled)) / math.log(100.0), 0.0  # λ from λ_max·exp(-D'_min/τ) down to λ_max/100
    if blend == "linear":
        # No clipping here (the clip to 0 has its own test): with 1 - D'/τ near 0 the rounding of D (~1e-11
        # relative on peaked logits, from cancellation in the KL sums) would be amplified past the tolerance.
        return 1.5 * float(np.max(d_scaled)), 0.0
    if blend == "sigmoid":
        spread = float(np.quantile(d_scaled, 0.9) - np.quantile(d_scaled, 0.1))
        return spread / 3.0 + 1e-6, median
    return 0.1, 0.1


# ----------------------------------------------------------------------------------------------------
# Data.


def make_logits(seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = {"random": 3.0, "peaked": 12.0}[kind]
    student = scale * torch.randn(N, V, generator=g, dtype=torch.float64)
    # The teacher agrees with the student on some positions and not on others: a spread of D.
    agreement = torch.linspace(0.1, 0.75, N, dtype=torch.float64).unsqueeze(-1)
    teacher = agreement * student + (1 - agreement) * scale * torch.randn(N, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (N,), generator=g)
    return student, teacher, tokens


def make_old_log_probs(student: torch.Tensor, tokens: torch.Tensor, seed: int) -> torch.Tensor:
    """Old log-probs with ratios on both sides of is_clip=1.5 and two beyond the ±20 log-ratio clamp."""
    g = torch.Generator().manual_seed(seed + 1000)
    current = student.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    offsets = torch.empty(N, dtype=torch.float64).uniform_(-1.2, 1.2, generator=g)
    offsets[0], offsets[1] = 25.0, -25.0
    # Away from the clip boundary log(1.5) so that ``ratio > is_clip`` is not decided by rounding.
    offsets = torch.where((offsets - math.log(1.5)).abs() < 0.05, offsets + 0.2, offsets)
    return current - offsets


def library_config(st: Settings, config_lambda_max: float) -> DistillationConfig:
    return DistillationConfig(
        top_k=st.top_k, tail_bucket=st.tail_bucket, alpha=st.alpha, discrepancy=st.discrepancy,
        blend=st.blend, lambda_max=config_lambda_max, temperature=st.temperature,
        sigmoid_center=st.sigmoid_center, is_clip=st.is_clip,
    )


def assert_matches_reference(losses, stats, refs: list[PositionReference]) -> None:
    expected = {
        "loss": [r.loss for r in refs],
        "lambda": [r.lam for r in refs],
        "discrepancy": [r.discrepancy for r in refs],
        "kl_teacher_student": [r.kl_teacher_student for r in refs],
        "kl_target_student": [r.kl_target_student for r in refs],
        "entropy": [r.entropy for r in refs],
        "is_weight": [r.weight for r in refs],
    }
    got = {"loss": losses, **stats}
    for name, values in expected.items():
        np.testing.assert_allclose(got[name].detach().double().numpy(), np.array(values), err_msg=name, **VALUE_TOL)
    np.testing.assert_array_equal(stats["is_clipped"].numpy().astype(bool), np.array([r.clipped for r in refs]))


def run_case(discrepancy, blend, alpha, top_k, tail_bucket, logits_kind, scale, lambda_arg, config_lambda_max,
             with_old=True, is_clip=1.5, seed=0):
    student, teacher, tokens = make_logits(seed, logits_kind)
    old = make_old_log_probs(student, tokens, seed) if with_old else None
    effective_lambda_max = config_lambda_max if lambda_arg is None else lambda_arg
    st = Settings(top_k, tail_bucket, discrepancy, blend, alpha, 1.0, 0.0, effective_lambda_max, scale, is_clip)
    d = ref_discrepancies(student.numpy(), teacher.numpy(), st)
    st.temperature, st.sigmoid_center = choose_temperature(d if scale is None else d / scale, blend)
    refs = ref_token_losses(student.numpy(), teacher.numpy(), tokens.numpy(),
                            None if old is None else old.numpy(), st)
    losses, stats = token_losses(student, teacher, tokens, library_config(st, config_lambda_max),
                                 old_log_probs=old, lambda_max=lambda_arg, discrepancy_scale=scale)
    return st, refs, losses, stats, (student, teacher, tokens, old)


# (logits, discrepancy_scale, lambda_max argument, config.lambda_max): every case has λ_max < 1.
VARIANTS = (
    ("random", None, 0.7, 1.0),
    ("peaked", 0.37, None, 0.6),
    ("random", 0.37, 0.7, 0.9),
    ("peaked", None, None, 0.8),
)


# ----------------------------------------------------------------------------------------------------
# 1. Losses and statistics.


@pytest.mark.parametrize("top_k,tail_bucket", SUPPORTS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("blend", BLEND_RULES)
@pytest.mark.parametrize("discrepancy", DISCREPANCY_KINDS)
def test_token_losses_match_the_reference(discrepancy, blend, alpha, top_k, tail_bucket):
    # Half of the variants per case, alternating, each half holding random and peaked logits, a scale and
    # none, λ_max from the argument and from the config.
    half = (ALPHAS.index(alpha) + SUPPORTS.index((top_k, tail_bucket)) + BLEND_RULES.index(blend)) % 2
    for variant in (2 * half, 2 * half + 1):
        logits_kind, scale, lambda_arg, config_lambda_max = VARIANTS[variant]
        st, refs, losses, stats, _ = run_case(discrepancy, blend, alpha, top_k, tail_bucket, logits_kind, scale,
                                              lambda_arg, config_lambda_max, seed=variant)
        lam = np.array([r.lam for r in refs])
        interior = (lam > 1e-3) & (lam < 1 - 1e-3)
        assert interior.mean() >= 0.75, f"λ inside (0, 1) for only {interior.mean():.0%} of tokens: {lam}"
        if blend != "constant":  # the rule m(D') itself is away from its ends, not only λ_max < 1
            shape = lam / st.lambda_max
            assert ((shape > 1e-3) & (shape < 1 - 1e-3)).mean() >= 0.75, shape
        assert_matches_reference(losses, stats, refs)


@pytest.mark.parametrize("top_k,tail_bucket", [(None, True), (K, True), (K, False)])
def test_linear_rule_clips_at_zero(top_k, tail_bucket):
    """τ between the 3rd and 2nd largest D': two tokens get λ = 0 exactly (target = student), the rest not."""
    student, teacher, tokens = make_logits(7, "random")
    st = Settings(top_k, tail_bucket, "jsd", "linear", 0.5, 1.0, 0.0, 0.7, 0.37, None)
    ordered = np.sort(ref_discrepancies(student.numpy(), teacher.numpy(), st) / 0.37)
    st.temperature = 0.5 * (ordered[-3] + ordered[-2])
    refs = ref_token_losses(student.numpy(), teacher.numpy(), tokens.numpy(), None, st)
    losses, stats = token_losses(student, teacher, tokens, library_config(st, 1.0), lambda_max=0.7,
                                 discrepancy_scale=0.37)
    assert_matches_reference(losses, stats, refs)
    lam = stats["lambda"].numpy()
    assert (lam == 0).sum() == 2 and ((lam > 0.01) & (lam < 0.69)).sum() >= N - 3
    np.testing.assert_allclose(losses.detach().numpy()[lam == 0], 0.0, atol=1e-15)


@pytest.mark.parametrize("is_clip", [1.5, 1e12, None])
@pytest.mark.parametrize("with_old", [True, False])
def test_importance_weight_cases(with_old, is_clip):
    st, refs, losses, stats, _ = run_case("jsd", "exp", 0.5, K, True, "random", 0.37, 0.7, 1.0,
                                          with_old=with_old, is_clip=is_clip, seed=3)
    assert_matches_reference(losses, stats, refs)
    weights = np.array([r.weight for r in refs])
    if with_old and is_clip == 1e12:
        # The ±20 clamp of the log-ratio: exp(20) and exp(-20), not exp(±25).
        np.testing.assert_allclose(weights[:2], [math.exp(20.0), math.exp(-20.0)], rtol=1e-12)
    elif with_old and is_clip == 1.5:
        assert (weights == 1.5).any() and (weights < 1.0).any()
        assert stats["is_clipped"].any() and not stats["is_clipped"].all()
    else:
        np.testing.assert_array_equal(stats["is_weight"].numpy(), np.ones(N))


def test_scale_divides_the_discrepancy():
    """D / scale, not D · scale: the two give clearly different λ here."""
    st, refs, losses, stats, _ = run_case("jsd", "exp", 0.5, K, True, "random", 0.37, 0.7, 1.0, seed=5)
    d = stats["discrepancy"].numpy()
    multiplied = 0.7 * np.exp(-d * 0.37 / st.temperature)
    divided = 0.7 * np.exp(-d / 0.37 / st.temperature)
    assert np.all(np.abs(multiplied - divided) > 1e-3)
    np.testing.assert_allclose(stats["lambda"].numpy(), divided, **VALUE_TOL)


def test_the_support_kl_teacher_student_differs_from_the_full_vocabulary_one():
    """The design's KL(p_T ‖ p_S) is on the support: on this data it is clearly not the full-vocabulary one."""
    st, refs, losses, stats, (student, teacher, _, _) = run_case("jsd", "exp", 0.5, K, False, "random", None,
                                                                 0.7, 1.0, seed=6)
    full = [ref_kl(ref_log_softmax(zt), ref_log_softmax(zs)) for zs, zt in zip(student.numpy(), teacher.numpy())]
    support = np.array([r.kl_teacher_student for r in refs])
    assert np.all(np.abs(support - np.array(full)) > 1e-3)
    np.testing.assert_allclose(stats["kl_teacher_student"].numpy(), support, **VALUE_TOL)


# ----------------------------------------------------------------------------------------------------
# 2. Teacher and student are not swapped in the asymmetric discrepancies.


@pytest.mark.parametrize("top_k,tail_bucket", [(None, True), (K, True), (K, False)])
@pytest.mark.parametrize("kind", ["kl_ts", "kl_st"])
def test_asymmetric_discrepancy_argument_order(kind, top_k, tail_bucket):
    g = torch.Generator().manual_seed(11)
    student = 0.5 * torch.randn(N, V, generator=g, dtype=torch.float64)  # flat student
    teacher = 6.0 * torch.randn(N, V, generator=g, dtype=torch.float64)  # peaked teacher
    tokens = torch.randint(0, V, (N,), generator=g)
    config = DistillationConfig(top_k=top_k, tail_bucket=tail_bucket, discrepancy=kind, blend="exp",
                                temperature=5.0, lambda_max=0.7, is_clip=None)
    _, stats = token_losses(student, teacher, tokens, config)
    st = Settings(top_k, tail_bucket, "kl_ts", "exp", 0.5, 5.0, 0.0, 0.7, None, None)
    kl_ts = ref_discrepancies(student.numpy(), teacher.numpy(), st)
    st.discrepancy = "kl_st"
    kl_st = ref_discrepancies(student.numpy(), teacher.numpy(), st)
    wanted, swapped = (kl_ts, kl_st) if kind == "kl_ts" else (kl_st, kl_ts)
    # The test has teeth: the two orders differ by a clear margin at every position...
    assert np.all(np.abs(kl_ts - kl_st) > 0.2 * np.maximum(kl_ts, kl_st))
    got = stats["discrepancy"].numpy()
    np.testing.assert_allclose(got, wanted, **VALUE_TOL)
    assert np.all(np.abs(got - swapped) > 0.1 * np.abs(wanted))
    # ...and so do the λ they give.
    np.testing.assert_allclose(stats["lambda"].numpy(), 0.7 * np.exp(-wanted / 5.0), **VALUE_TOL)


# ----------------------------------------------------------------------------------------------------
# 3. The gradient: library autograd vs central differences of the reference, stop-gradient parts fixed.


@pytest.mark.parametrize("logits_kind", ["random", "peaked"])
@pytest.mark.parametrize("top_k,tail_bucket", [(None, True), (K, True), (K, False)])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_matches_finite_differences_of_the_reference(alpha, top_k, tail_bucket, logits_kind):
    discrepancy, blend = {0.0: ("kl_ts", "exp"), 0.3: ("jsd", "sigmoid"),
                          0.5: ("tv", "linear"), 1.0: ("kl_st", "exp")}[alpha]
    st, refs, _, _, (student, teacher, tokens, old) = run_case(
        discrepancy, blend, alpha, top_k, tail_bucket, logits_kind, 0.37, 0.7, 1.0, seed=21)
    coefficients = torch.linspace(0.3, 1.7, N, dtype=torch.float64)

    leaf = student.clone().requires_grad_(True)
    losses, stats = token_losses(leaf, teacher, tokens, library_config(st, 1.0),
                                 old_log_probs=old, lambda_max=0.7, discrepancy_scale=0.37)
    (coefficients * losses).sum().backward()
    grad = leaf.grad.numpy()
    # The fixed parts of the reference are the library's (λ and w; q follows from them).
    np.testing.assert_allclose(stats["lambda"].numpy(), [r.lam for r in refs], **VALUE_TOL)
    np.testing.assert_allclose(stats["is_weight"].numpy(), [r.weight for r in refs], **VALUE_TOL)

    h = 1e-5
    z = student.numpy()
    expected = np.zeros_like(z)
    for i in range(N):
        for j in range(V):
            up, down = z[i].copy(), z[i].copy()
            up[j] += h
            down[j] -= h
            expected[i, j] = coefficients[i].item() * (
                ref_row_loss(up, refs[i], st) - ref_row_loss(down, refs[i], st)) / (2 * h)
    assert np.abs(expected).max() > 1e-3  # a gradient that is not trivially zero
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------
# 4. The λ_max schedule.


def ref_lambda_max_at(peak: float, warmup: int, decay: int, final: float | None, step: int) -> float:
    if step < warmup:
        return peak * step / warmup
    if final is None or decay <= 0:
        return peak
    done = step - warmup
    if done >= decay:
        return final
    return peak + (final - peak) * done / decay


@pytest.mark.parametrize("peak,warmup,decay,final", [
    (0.8, 10, 0, None),      # warm-up only
    (1.0, 0, 20, 0.2),       # decay only
    (0.9, 5, 10, 0.0),       # warm-up, then decay to 0
    (0.5, 4, 6, 1.0),        # "decay" upwards to a larger final value
    (0.7, 3, 0, 0.1),        # a final value without decay steps: constant after warm-up
    (0.6, 0, 8, None),       # decay steps without a final value: constant
    (1.0, 0, 0, None),       # constant
])
def test_lambda_max_schedule(peak, warmup, decay, final):
    config = DistillationConfig(lambda_max=peak, lambda_warmup_steps=warmup, lambda_decay_steps=decay,
                                lambda_final=final)
    steps = range(0, warmup + decay + 15)
    got = [lambda_max_at(config, step) for step in steps]
    want = [ref_lambda_max_at(peak, warmup, decay, final, step) for step in steps]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[0] == pytest.approx(0.0 if warmup else peak, abs=1e-15)
    assert got[-1] == pytest.approx(final if (final is not None and decay) else peak, abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# 5. The EMA normaliser of the discrepancy.


def test_discrepancy_normalizer_recursion_and_state_round_trip():
    momentum = 0.75
    normalizer = DiscrepancyNormalizer(momentum)
    assert normalizer.scale is None
    batch_means = [0.4, 0.1, 0.9, 0.25, 0.6]
    scale = None
    for x in batch_means:
        normalizer.update(x)
        scale = x if scale is None else momentum * scale + (1 - momentum) * x
        assert normalizer.scale == pytest.approx(scale, rel=1e-15)
    assert normalizer.scale != pytest.approx(float(np.mean(batch_means)))  # an EMA, not a plain mean

    fresh = DiscrepancyNormalizer(0.3)
    fresh.load_state_dict(normalizer.state_dict())
    assert fresh.scale == normalizer.scale and fresh.momentum == momentum
    fresh.update(2.0)
    normalizer.update(2.0)
    assert fresh.scale == normalizer.scale == pytest.approx(momentum * scale + (1 - momentum) * 2.0, rel=1e-15)


def test_discrepancy_normalizer_first_update_is_the_batch_mean():
    normalizer = DiscrepancyNormalizer(0.9)
    normalizer.update(0.123)
    assert normalizer.scale == 0.123


@pytest.mark.parametrize("momentum", [0.0, 1.0, 1.5, -0.25])
def test_discrepancy_normalizer_rejects_invalid_momentum(momentum):
    with pytest.raises(ValueError) as error:
        DiscrepancyNormalizer(momentum)
    assert repr(momentum) in str(error.value)


def test_tail_bucket_log_mass_cap_is_exercised():
    """Peaked logits put more than 1 - 1e-7 of the student's mass on its top-k at some positions: there the
    tail entry is log(-expm1(-1e-7)), and the losses differ (beyond the tolerance) from an uncapped tail."""
    st, refs, losses, stats, (student, _, _, _) = run_case("jsd", "exp", 0.5, K, True, "peaked", None, 0.7, 1.0,
                                                           seed=0)
    capped = [ref_logsumexp(ref_log_softmax(z)[r.index]) > TAIL_LOG_MASS_CAP for z, r in zip(student.numpy(), refs)]
    assert sum(capped) >= 2
    assert_matches_reference(losses, stats, refs)
    uncapped = []
    for z, r in zip(student.numpy(), refs):
        picked = ref_log_softmax(z)[r.index]
        s = np.append(picked, math.log(-math.expm1(ref_logsumexp(picked))))
        uncapped.append(ref_divergence(s, r.target, st.alpha) * r.weight)
    differs = ~np.isclose(losses.detach().numpy(), np.array(uncapped), **VALUE_TOL)
    assert differs[np.array(capped)].sum() >= 2
