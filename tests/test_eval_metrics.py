"""Tests for pass@k and the per-question sample summary, against hand-computed values and brute force."""

import itertools
import math
from math import comb

import numpy as np
import pytest

from demopsd.evaluation.metrics import pass_at_k, summarize_samples


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),  # 3 of the 6 pairs hold the one correct sample
        (4, 2, 2, 5 / 6),  # only the pair of the two wrong ones misses
        (5, 1, 1, 0.2),
        (10, 3, 1, 0.3),
        (4, 0, 3, 0.0),
        (4, 4, 3, 1.0),
        (4, 2, 3, 1.0),  # 3 samples from 2 wrong ones must hold a correct one
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration_and_binomials(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            value = pass_at_k(n, c, k)
            assert value == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
            assert value == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not need it.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(1000, 500, 1) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(1000, 0, 500) == 0.0


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (4, 1, 5, "k=5 is invalid for n=4: 1 <= k <= n is accepted"),
        (4, 1, 0, "k=0 is invalid for n=4"),
        (4, 5, 2, "c=5 is invalid for n=4: 0 <= c <= n is accepted"),
        (4, -1, 2, "c=-1 is invalid for n=4"),
        (0, 0, 1, "k=1 is invalid for n=0"),
    ],
)
def test_pass_at_k_rejects_bad_arguments(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_pass_at_k_rejects_non_integers():
    with pytest.raises(TypeError, match=r"k=2.0 must be an integer"):
        pass_at_k(4, 1, 2.0)
    with pytest.raises(TypeError, match=r"c=True must be an integer"):
        pass_at_k(4, True, 2)


def test_summary_by_hand():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    # acc: (1/4 + 2/4 + 0) / 3 = 0.25; pass@2: (0.5 + 5/6 + 0) / 3 = 4/9; pass@4: (1 + 1 + 0) / 3
    # acc s.e.: fractions 1/4, 1/2, 0 around 1/4: variance (1/16 + 1/16) / 2 = 1/16, s.e. sqrt(1/16 / 3)
    se = math.sqrt(1 / 48)
    assert summarize_samples(correct, k=2) == pytest.approx({"acc_avg@2": 0.25, "pass@2": 4 / 9, "acc_avg_se@2": se})
    assert summarize_samples(correct) == pytest.approx({"acc_avg@4": 0.25, "pass@4": 2 / 3, "acc_avg_se@4": se})
    assert summarize_samples(correct, k=1) == pytest.approx({"acc_avg@1": 0.25, "pass@1": 0.25, "acc_avg_se@1": se})


def test_summary_keys_name_k_and_accept_zero_one():
    correct = [[1, 0] * 8, [0] * 16]
    assert set(summarize_samples(correct)) == {"acc_avg@16", "pass@16", "acc_avg_se@16"}
    assert summarize_samples(correct)["pass@16"] == 0.5
    assert summarize_samples(correct, k=3) == summarize_samples([[bool(x) for x in q] for q in correct], k=3)


@pytest.mark.parametrize("n", [3, 5])
def test_summary_matches_enumeration(n):
    """Every correctness pattern of two questions, against subset enumeration over each question's samples."""
    for first, second in itertools.product(itertools.product([False, True], repeat=n), repeat=2):
        for k in range(1, n + 1):
            summary = summarize_samples([first, second], k=k)
            expected = [brute_pass_at_k(n, sum(q), k) for q in (first, second)]
            assert summary[f"pass@{k}"] == pytest.approx(sum(expected) / 2, abs=1e-12)
            assert summary[f"acc_avg@{k}"] == pytest.approx((sum(first) + sum(second)) / (2 * n), abs=1e-12)


@pytest.mark.parametrize(
    ("correct", "k", "message"),
    [
        ([[True, False], [True]], None, "question 1 has 1 samples but question 0 has 2"),
        ([], None, "correct is empty"),
        ([[], []], None, "questions have no samples"),
        ([[True, 0.5]], None, "question 0 has correctness value 0.5"),
        ([[True, False]], 3, "k=3 is invalid for n=2"),
    ],
)
def test_summary_rejects_bad_input(correct, k, message):
    with pytest.raises(ValueError, match=message):
        summarize_samples(correct, k=k)


def test_accuracy_standard_error_is_over_questions_not_answers():
    """Against numpy: the s.e. of the per-question means. Four answers that agree on each question are one
    measurement of it, so the s.e. is that of the questions, larger than a binomial over all the answers."""
    rng = np.random.default_rng(0)
    correct = (rng.random((40, 1)) < 0.3).repeat(4, axis=1).tolist()  # each question all right or all wrong
    fractions = np.array(correct, dtype=float).mean(axis=1)
    summary = summarize_samples(correct)
    assert summary["acc_avg_se@4"] == pytest.approx(fractions.std(ddof=1) / np.sqrt(40), rel=1e-12)
    binomial = np.sqrt(summary["acc_avg@4"] * (1 - summary["acc_avg@4"]) / 160)
    assert summary["acc_avg_se@4"] > 1.9 * binomial  # about 2x: four answers per question, all alike
    assert summarize_samples([[True, False, True], [True, True, True]])["acc_avg_se@3"] == pytest.approx(1 / 6)


def test_one_question_has_no_standard_error():
    assert set(summarize_samples([[True, False]])) == {"acc_avg@2", "pass@2"}
