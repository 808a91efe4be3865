"""The process's global random states, kept across work that draws from them or reseeds them."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def random_states_kept() -> Iterator[None]:
    """On exit, Python's, NumPy's and torch's global random states (the CPU's and every CUDA device's) are what
    they were on entry, whatever the block drew or seeded: an evaluation sampling its answers, or a vLLM engine
    being built (its worker seeds all of them with the engine's ``seed``, which would give every training process
    the same stream and undo the per-process seeds of ``ProcessSeeds`` in :mod:`demopsd.training.run`)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
