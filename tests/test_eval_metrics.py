"""Tests for pass@k, the per-question sample summary and the answers' letters, against hand-computed values,
brute force and scipy."""

import itertools
import math
from math import comb

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import entropy as scipy_entropy

from demopsd.evaluation.metrics import (
    answer_letter_metrics,
    marginal_entropy,
    pass_at_k,
    summarize_samples,
    top_share,
)


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


# --------------------------------------------------------------------------- the answers' letters


def test_collapse_onto_one_letter_and_an_even_spread_by_hand():
    collapsed = [["B"] * 4 for _ in range(5)]
    assert answer_letter_metrics(collapsed) == {"answer_top_share": 1.0, "answer_letter_entropy": 0.0,
                                                "distinct_answers@4": 1.0}
    assert f"{answer_letter_metrics(collapsed)['answer_letter_entropy']:.3f}" == "0.000"  # not "-0.000" in tables
    # each question answered A, B, C, D once: the marginal is uniform, every question has four distinct answers
    spread = [list("ABCD"), list("DCBA"), list("BADC")]
    assert answer_letter_metrics(spread) == pytest.approx({"answer_top_share": 0.25,
                                                           "answer_letter_entropy": math.log(4),
                                                           "distinct_answers@4": 4.0})
    # each question answered with one letter, a different one per question: no diversity within a question, and
    # yet no collapse across questions (what the per-question probe entropy cannot tell apart)
    agreeing = [[letter] * 3 for letter in "ABCD"]
    assert answer_letter_metrics(agreeing, k=3) == pytest.approx({"answer_top_share": 0.25,
                                                                  "answer_letter_entropy": math.log(4),
                                                                  "distinct_answers@3": 1.0})


def test_unparseable_answers_leave_the_marginal_and_add_no_distinct_answer():
    # letters A, A, A, B (6 answers name none): top share 3/4, entropy of (3/4, 1/4)
    predicted = [["A", None, None, "B"], ["A", "A", None, None], [None] * 4]
    metrics = answer_letter_metrics(predicted)
    assert metrics["answer_top_share"] == pytest.approx(0.75)
    assert metrics["answer_letter_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert metrics["distinct_answers@4"] == pytest.approx((2 + 1 + 0) / 3)
    assert answer_letter_metrics([[None, None]]) == {"distinct_answers@2": 0.0}  # no letter: no marginal to measure


@given(st.lists(st.lists(st.sampled_from(["A", "B", "C", "D", None]), min_size=3, max_size=3), min_size=1, max_size=12))
def test_letter_metrics_match_an_independent_computation(predicted):
    """Against numpy's counts and scipy's entropy, for any pattern of letters and unparseable answers."""
    metrics = answer_letter_metrics(predicted)
    letters = [a for answers in predicted for a in answers if a is not None]
    assert metrics["distinct_answers@3"] == pytest.approx(np.mean([len(set(q) - {None}) for q in predicted]))
    if not letters:
        assert set(metrics) == {"distinct_answers@3"}
        return
    _, counts = np.unique(letters, return_counts=True)
    assert metrics["answer_top_share"] == pytest.approx(counts.max() / len(letters))
    assert metrics["answer_letter_entropy"] == pytest.approx(scipy_entropy(counts), abs=1e-12)
    assert 1 / len(counts) - 1e-12 <= metrics["answer_top_share"] <= 1
    assert 0 <= metrics["answer_letter_entropy"] <= math.log(len(counts)) + 1e-12


@pytest.mark.parametrize("n", [3, 5])
def test_distinct_answers_at_k_is_the_mean_over_k_subsets(n):
    """Every letter pattern of one question's n answers (a fourth of them unparseable), against enumeration."""
    for answers in itertools.product(["A", "B", "C", None], repeat=n):
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(answers, k))
            expected = sum(len(set(subset) - {None}) for subset in subsets) / len(subsets)
            assert answer_letter_metrics([list(answers)], k)[f"distinct_answers@{k}"] == pytest.approx(expected)


def test_top_share_and_marginal_entropy_of_any_values():
    assert top_share(["x", "y", "x"]) == pytest.approx(2 / 3) and top_share([3]) == 1.0
    assert marginal_entropy(["x", "y", "x"]) == pytest.approx(scipy_entropy([2, 1]))
    for function in (top_share, marginal_entropy):
        with pytest.raises(ValueError, match="values is empty"):
            function([])


@pytest.mark.parametrize(("predicted", "k", "message"), [
    ([], None, "predicted is empty"),
    ([["A"], ["A", "B"]], None, r"questions have \[1, 2\] answers"),
    ([[], []], None, r"questions have \[0\] answers"),
    ([["A", "B"]], 3, "k=3 is invalid for n=2"),
])
def test_letter_metrics_reject_bad_input(predicted, k, message):
    with pytest.raises(ValueError, match=message):
        answer_letter_metrics(predicted, k)
