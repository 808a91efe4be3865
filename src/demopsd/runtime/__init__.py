"""What a run stands on: loading models, sharding, the checkpoint layout and resume, loggers, provenance.

May import: ``config``.
"""
