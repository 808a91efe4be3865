"""Reading finished runs: plots and tables over run directories, the console summary, the W&B dashboard.

May import: ``config``, ``runtime``, ``evaluation`` (how its metrics are defined).
"""
