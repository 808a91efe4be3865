"""Settings: the typed, validated sections of a run's config, and the check that runs before anything loads.

May import: ``objectives`` (the objective settings).
"""
