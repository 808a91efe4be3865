"""Evaluation metrics over sampled answers: mean accuracy, the unbiased pass@k, and the answers' letters.

Each question is answered ``n`` times and every answer is marked correct or not. ``acc_avg@k`` is
the mean over questions of the fraction of correct samples; ``pass@k`` is the mean over questions of
the probability that at least one of ``k`` samples drawn without replacement from the ``n`` is correct
(the unbiased estimator of Chen et al., 2021, "Evaluating Large Language Models Trained on Code").
``acc_avg_se@k`` is the standard error of ``acc_avg@k`` over questions: the sample standard deviation
(``ddof=1``) of the per-question fractions over the square root of the number of questions. It treats the
questions as the random draw and a question's ``n`` answers as one measurement of it, so answers to the same
question are not counted as independent evidence.

The letters the answers name tell collapse from exploration (:func:`answer_letter_metrics`): ``answer_top_share``
is the share of the most frequent letter among all the sampled answers that name one, ``answer_letter_entropy``
the entropy (nats) of that marginal distribution over letters, across questions: a policy that answers the same
letter whatever the question has a top share of 1 and an entropy of 0, however uncertain it is on each question.
``distinct_answers@k`` is the mean over questions of the number of distinct letters among ``k`` of a question's
answers: 1 when every answer to a question agrees, up to ``min(k, options)`` when they spread out. From ``n >= k``
answers it is the expected number among ``k`` drawn without replacement, ``sum_l pass_at_k(n, c_l, k)`` over the
letters ``l`` named ``c_l`` times (the number itself when ``k = n``). An answer that names no option letter is left
out of the marginal and adds no distinct answer (the ``format_rate`` counts it).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Hashable, Sequence
from numbers import Integral


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n - c, k) / C(n, k)``: the chance that ``k`` of ``n`` samples, ``c`` of them correct, hold a correct one.

    Computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which avoids huge binomials.
    Requires ``1 <= k <= n`` and ``0 <= c <= n``.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, Integral) or isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be an integer")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is invalid for n={n}: 1 <= k <= n is accepted")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} is invalid for n={n}: 0 <= c <= n is accepted")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def summarize_samples(correct: Sequence[Sequence[bool]], k: int | None = None) -> dict[str, float]:
    """``{"acc_avg@<k>": ..., "pass@<k>": ..., "acc_avg_se@<k>": ...}`` over questions, each with the same number
    ``n`` of samples.

    ``correct[q][s]`` tells whether sample ``s`` of question ``q`` is correct (a bool, or 0/1).
    ``k`` defaults to ``n``. ``acc_avg@k`` is the mean correctness over all samples (it does not
    depend on ``k``; the key names the sampling budget it was reported with). ``acc_avg_se@k``, its
    standard error over questions, needs two questions or more and is left out for one.
    """
    if len(correct) == 0:
        raise ValueError("correct is empty: at least one question is required")
    n = len(correct[0])
    for q, samples in enumerate(correct):
        if len(samples) != n:
            raise ValueError(f"question {q} has {len(samples)} samples but question 0 has {n}: all must be equal")
        bad = [value for value in samples if value not in (0, 1)]
        if bad:
            raise ValueError(f"question {q} has correctness value {bad[0]!r}: True/False (or 1/0) is accepted")
    if n == 0:
        raise ValueError("questions have no samples: at least one per question is required")
    k = n if k is None else k
    counts = [sum(bool(value) for value in samples) for samples in correct]
    fractions = [c / n for c in counts]
    summary = {f"acc_avg@{k}": statistics.fmean(fractions),
               f"pass@{k}": statistics.fmean(pass_at_k(n, c, k) for c in counts)}
    if len(fractions) > 1:
        summary[f"acc_avg_se@{k}"] = statistics.stdev(fractions) / math.sqrt(len(fractions))
    return summary


def top_share(values: Sequence[Hashable]) -> float:
    """The share of the most frequent value among ``values`` (1 when all are equal; at least ``1 / distinct``)."""
    if not values:
        raise ValueError("values is empty: the share of the most frequent value needs at least one")
    return Counter(values).most_common(1)[0][1] / len(values)


def marginal_entropy(values: Sequence[Hashable]) -> float:
    """The entropy (nats) of the empirical distribution of ``values``: ``-sum_v f_v log f_v`` over their frequencies."""
    if not values:
        raise ValueError("values is empty: the entropy of their distribution needs at least one")
    return 0.0 - sum(c / len(values) * math.log(c / len(values)) for c in Counter(values).values())  # 0.0, not -0.0


def answer_letter_metrics(predicted: Sequence[Sequence[str | None]], k: int | None = None) -> dict[str, float]:
    """``{"answer_top_share": ..., "answer_letter_entropy": ..., "distinct_answers@<k>": ...}`` over questions, each
    with the same number ``n`` of sampled answers (see the module doc).

    ``predicted[q][s]`` is the option letter answer ``s`` to question ``q`` names, or None for one that names none.
    ``k`` defaults to ``n`` (requires ``1 <= k <= n``). The first two are left out when no answer names a letter.
    """
    if len(predicted) == 0:
        raise ValueError("predicted is empty: at least one question is required")
    n = len(predicted[0])
    if n == 0 or any(len(answers) != n for answers in predicted):
        sizes = sorted({len(answers) for answers in predicted})
        raise ValueError(f"questions have {sizes} answers: the same number >= 1 is required")
    k = n if k is None else k
    letters = [letter for answers in predicted for letter in answers if letter is not None]
    counts = [Counter(a for a in answers if a is not None).values() for answers in predicted]
    metrics = {f"distinct_answers@{k}": statistics.fmean(sum(pass_at_k(n, c, k) for c in q) for q in counts)}
    if letters:
        metrics |= {"answer_top_share": top_share(letters), "answer_letter_entropy": marginal_entropy(letters)}
    return metrics


CHANGE_METRICS = ("entropy", "letter_entropy", "letter_confidence", "letter_accuracy", "letter_p_answer",
                  "overconfidence")
"""Logged also as ``<metric>_change`` from the starting model (step 0), when it was evaluated."""


def changes_from(baseline: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """``<name>_change`` = ``metrics[name] - baseline[name]`` for the :data:`CHANGE_METRICS` in both."""
    return {f"{name}_change": value - baseline[name] for name, value in metrics.items()
            if name in baseline and name.rsplit("/", 1)[-1] in CHANGE_METRICS}
