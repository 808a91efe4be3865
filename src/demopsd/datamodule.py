"""Prompts for training: a shuffled, seeded stream of multiple-choice examples in batches of prompts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from demopsd.data import MCQExample, load_split

log = logging.getLogger(__name__)
SKIPPED_ROWS_METRIC = "data/skipped_rows"


class PromptDataModule(L.LightningDataModule):
    """Batches of ``data.batch_size`` examples (a plain list each) from the ``data.train_split`` of ``data``.

    The order is drawn from a generator seeded with ``seed``, so the same seed gives the same batches.
    ``skipped_rows`` counts the bad rows of the split left out under ``data.on_bad_row=skip``; ``setup`` logs
    it once as ``data/skipped_rows`` (step 0) to the trainer's loggers, and prints a notice when it is not 0.
    """

    def __init__(
        self,
        data: Mapping,
        *,
        data_dir: str | Path | None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if data["batch_size"] < 1:
            raise ValueError(f"data.batch_size={data['batch_size']} is invalid: at least 1 prompt per step is accepted")
        self.data, self.data_dir, self.seed = data, data_dir, seed
        self.batch_size, self.num_workers = data["batch_size"], data.get("num_workers", 0)
        self.train_examples: list[MCQExample] = []
        self.skipped_rows = 0
        self._skipped_rows_logged = False

    def setup(self, stage: str | None = None) -> None:
        if not self.train_examples:
            self.train_examples = load_split(self.data, self.data["train_split"], self.data_dir)
            self.skipped_rows = getattr(self.train_examples, "skipped", 0)
            if self.skipped_rows:
                print(
                    f"Notice: skipped {self.skipped_rows} bad rows of {self.data['name']}/{self.data['train_split']} "
                    f"(data.on_bad_row=skip; the warning above lists why); training on {len(self.train_examples)}"
                )
        self._log_skipped_rows()
        if len(self.train_examples) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {len(self.train_examples)} examples of "
                f"{self.data['name']}/{self.data['train_split']}"
            )

    def _log_skipped_rows(self) -> None:
        """``data/skipped_rows`` to every logger of the attached trainer, once (nothing without a trainer)."""
        trainer = self.trainer
        if self._skipped_rows_logged or trainer is None or not trainer.loggers:
            return
        for logger in trainer.loggers:
            logger.log_metrics({SKIPPED_ROWS_METRIC: float(self.skipped_rows)}, step=0)
        self._skipped_rows_logged = True
        log.info("%s=%d (%s/%s)", SKIPPED_ROWS_METRIC, self.skipped_rows, self.data["name"], self.data["train_split"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_examples,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=list,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
        )
