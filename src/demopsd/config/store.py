"""The settings dataclasses as Hydra's defaults: each is stored in Hydra's ConfigStore under ``settings/``, and
conf/ YAML files start their defaults list with the one they extend, so they hold only what differs from it.

=====================================  =================================================
``/settings/train``, ``/settings/eval_run``  the top-level keys of ``conf/train.yaml`` / ``conf/eval.yaml``
``/settings/method/<kind>``             a kind of method (:data:`demopsd.config.methods.METHODS`)
``/settings/data/<source>``             a data source (:data:`demopsd.config.sections.DATA_SOURCES`)
``/settings/rollout/<backend>``         a rollout engine (:data:`demopsd.config.settings.ROLLOUT_BACKENDS`)
``/settings/eval``, ``model``, ``paths``, ``logger``   the sections of those groups
=====================================  =================================================

Importing this module stores them (``src/train.py``, ``src/eval.py`` and the tests do; so must a script that
composes conf/ with Hydra's compose API). The nodes are plain mappings of the defaults, not typed structured
configs: the values are checked by :func:`demopsd.config.check.validate_config`, which reports every problem at
once in the project's words.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from demopsd.config.run import EvalRunSettings, TrainSettings
from demopsd.config.sections import DATA_SOURCES, EvalSettings, LoggerConfig, ModelConfig, PathsConfig
from demopsd.config.settings import ROLLOUT_BACKENDS, defaults_of

TRAIN_TOP_LEVEL = ("seed", "task_name", "ckpt_path", "optimized_metric", "optim", "memory", "fsdp", "checkpoint",
                   "guards")
"""The keys of ``/settings/train``: the train config's keys that no config group sets."""
EVAL_TOP_LEVEL = ("seed", "task_name", "ckpt_path", "device")


def store_settings() -> None:
    """Every ``/settings/...`` node but the methods', which :func:`demopsd.config.methods.register_method` stores
    as it registers each kind (:data:`~demopsd.config.methods.METHODS`)."""
    store = ConfigStore.instance()
    store.store(group="settings", name="train", node=defaults_of(TrainSettings, TRAIN_TOP_LEVEL))
    store.store(group="settings", name="eval_run", node=defaults_of(EvalRunSettings, EVAL_TOP_LEVEL))
    for source, cls in DATA_SOURCES.items():
        store.store(group="settings/data", name=source, node=defaults_of(cls))
    for backend, cls in ROLLOUT_BACKENDS.items():
        store.store(group="settings/rollout", name=backend, node=defaults_of(cls))
    for name, cls in (("eval", EvalSettings), ("model", ModelConfig), ("paths", PathsConfig), ("logger", LoggerConfig)):
        store.store(group="settings", name=name, node=defaults_of(cls))


store_settings()
