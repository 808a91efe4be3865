"""The shared test setup of tests/conftest.py: what it promises every test."""

import random

import numpy as np
import torch
from hypothesis import settings

from tests.helpers import global_random_states


def test_hypothesis_runs_the_same_examples_without_timing_limits():
    for profile in (settings.default, settings(max_examples=5)):  # what a test's own @settings starts from
        assert profile.derandomize and profile.database is None and profile.deadline is None


def test_global_random_states_are_restored_whatever_happens_inside():
    with global_random_states():
        draws = random.random(), np.random.rand(), torch.rand(3)
    with global_random_states():
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        random.random(), np.random.rand(), torch.rand(3)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
