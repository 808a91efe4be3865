"""How a training step's rollouts are cut for the GPU's memory: micro-batches sized by a token budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from demopsd.config.settings import check_rules


@dataclass(frozen=True)
class MemoryConfig:
    """``memory``: each process runs its rollouts through the model in micro-batches of at most
    ``micro_batch_tokens`` padded tokens (rows × (longest prompt + longest response) of the micro-batch), whose
    gradients accumulate into the mini-batch's update; a single longer rollout forms a micro-batch of its own.
    ``None``: all of a mini-batch's rollouts in one forward and backward. The split changes memory and speed,
    never the update (the loss of a mini-batch is the sum of its micro-batches' shares)."""

    SECTION: ClassVar[str] = "memory"
    micro_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        check_rules(
            self.SECTION,
            (self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "micro_batch_tokens",
             self.micro_batch_tokens, "null (a whole mini-batch at once) or a positive number of tokens"),
        )
