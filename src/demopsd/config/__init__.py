"""Settings: the typed, validated sections of a run's config (the objectives' among them), and the check that
builds them once, before anything heavy loads.

May import: nothing else of demopsd (the lowest stage).
"""
