"""Training: the run assembled from a config, the LightningModule, one step object per method, the teacher's
privileged contexts, the EMA teacher, numerical guards, and the format warm-up.

May import: every other stage (``objectives``, ``config``, ``runtime``, ``data``, ``rollout``, ``evaluation``,
``report``).
"""
