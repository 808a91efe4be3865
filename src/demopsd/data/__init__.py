"""The multiple-choice data: the example type, SciKnowEval, GPQA, the synthetic leakage task, loading by config,
rewards, and the training datamodule.

May import: ``config``.
"""
