"""The untrained default model on held-out uninferable questions: at chance, as the task's design says."""

import math

import pytest
from scipy.stats import binomtest

from demopsd.config.settings import EvalConfig
from demopsd.data.synthetic import generate_synthetic
from demopsd.data.types import student_conversation
from demopsd.evaluation.evaluate import answer_letter_probs
from demopsd.rollout.batch import encode_prompts
from demopsd.runtime.models import load_model_and_tokenizer

pytestmark = pytest.mark.slow
QUESTIONS = 60


def test_untrained_model_is_at_chance_on_held_out_uninferable_questions(default_model_cache):
    """The correct letter is drawn independently of the text, so whatever the model's letter biases, its
    expected probability of the right letter is exactly 1/4 and its argmax accuracy is Binomial(n, 1/4)."""
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct", cache_dir=default_model_cache[0])
    examples = generate_synthetic("uninferable", "test", seed=0, size=QUESTIONS)
    probs = []
    for start in range(0, QUESTIONS, 20):
        batch = examples[start : start + 20]
        prompts = encode_prompts(tokenizer, [student_conversation(e) for e in batch])
        probs += answer_letter_probs(model, tokenizer, prompts, batch, EvalConfig().probe_prefix)

    p_answer = [p[e.answer] for p, e in zip(probs, examples)]
    mean = sum(p_answer) / QUESTIONS
    se = math.sqrt(sum((p - mean) ** 2 for p in p_answer) / (QUESTIONS - 1) / QUESTIONS)
    assert abs(mean - 0.25) < 4 * se + 1e-3, (mean, se)
    correct = sum(max(p, key=p.get) == e.answer for p, e in zip(probs, examples))
    assert binomtest(correct, QUESTIONS, 0.25).pvalue > 1e-3, correct
    assert max(max(p.values()) for p in probs) < 1.0  # a real distribution, not a one-hot artefact
