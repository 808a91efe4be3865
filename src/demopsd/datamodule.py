"""Prompts for training: a shuffled, seeded stream of multiple-choice examples in batches of prompts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from demopsd.data import MCQExample, load_split


class PromptDataModule(L.LightningDataModule):
    """Batches of ``data.batch_size`` examples (a plain list each) from the ``data.train_split`` of ``data``.

    The order is drawn from a generator seeded with ``seed``, so the same seed gives the same batches.
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

    def setup(self, stage: str | None = None) -> None:
        if not self.train_examples:
            self.train_examples = load_split(self.data, self.data["train_split"], self.data_dir)
        if len(self.train_examples) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {len(self.train_examples)} examples of "
                f"{self.data['name']}/{self.data['train_split']}"
            )

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
