"""How long a collective may wait (NCCL's watchdog) is a key of trainer=ddp and trainer=fsdp, and reaches the
strategy Lightning builds the process group with."""

from datetime import timedelta

import hydra
import pytest
from lightning.pytorch.strategies import DDPStrategy

from demopsd.runtime.sharding import FullyShardedStrategy
from tests.fixed_step import train_config


@pytest.mark.parametrize("trainer, strategy", [("ddp", DDPStrategy), ("fsdp", FullyShardedStrategy)])
@pytest.mark.parametrize("overrides, minutes", [([], 30), (["trainer.strategy.timeout.minutes=120"], 120)])
def test_the_collective_timeout_is_a_config_key_of_the_multi_process_trainers(trainer, strategy, overrides, minutes):
    cfg = train_config("demopsd", f"trainer={trainer}", *overrides)
    built = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(built) is strategy
    assert built._timeout == timedelta(minutes=minutes)  # what Lightning passes to init_process_group
