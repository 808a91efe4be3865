"""Held-out evaluation: sampled and greedy answers, the answer-letter probe, their metrics, and the runner used
during training and by ``src/eval.py``.

May import: ``objectives``, ``config``, ``runtime``, ``data``, ``rollout``.
"""
