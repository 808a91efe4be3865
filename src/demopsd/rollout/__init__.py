"""Rollouts: prompt and rollout batches, the engine protocol with its ``generate`` and vLLM engines, and the
hidden-state forward the trainer scores them with.

May import: ``config``, ``runtime``.
"""
