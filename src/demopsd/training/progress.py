"""The progress bar of a training run: training steps, the step's reward and λ, nothing else."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled by training steps (batches of prompts, each one or more updates).

    A run is usually ``trainer.max_steps`` steps over an endless stream of batches, so Lightning's label, "Epoch 0/-2"
    (its epoch limit, -1 for none, less one), would read as a fault; and the logger's run id (``v_num``) is not
    progress.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        return "training steps"

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
