"""Settings: the typed, validated sections of a run's config (the objectives' among them), the method registry
(:mod:`demopsd.config.methods`), their defaults stored for Hydra (:mod:`demopsd.config.store`), and the check that
builds them once, before anything heavy loads.

May import: nothing else of demopsd (the lowest stage).
"""
