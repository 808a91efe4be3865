"""Evaluation metrics over sampled answers: mean accuracy and the unbiased pass@k.

Each question is answered ``n`` times and every answer is marked correct or not. ``acc_avg@k`` is
the mean over questions of the fraction of correct samples; ``pass@k`` is the mean over questions of
the probability that at least one of ``k`` samples drawn without replacement from the ``n`` is correct
(the unbiased estimator of Chen et al., 2021, "Evaluating Large Language Models Trained on Code").
``acc_avg_se@k`` is the standard error of ``acc_avg@k`` over questions: the sample standard deviation
(``ddof=1``) of the per-question fractions over the square root of the number of questions. It treats the
questions as the random draw and a question's ``n`` answers as one measurement of it, so answers to the same
question are not counted as independent evidence.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
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
