"""Prompts for training: a shuffled, seeded stream of multiple-choice examples in batches of prompts."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from demopsd.data import MCQExample, load_sciknoweval

SOURCES = ("sciknoweval",)


class PromptDataModule(L.LightningDataModule):
    """Batches of ``batch_size`` examples (a plain list each) from ``source``'s ``train_split``.

    The order is drawn from a generator seeded with ``seed``, so the same seed gives the same batches.
    """

    def __init__(
        self,
        *,
        source: str,
        domain: str,
        data_dir: str | Path | None,
        batch_size: int,
        seed: int = 0,
        train_split: str = "train",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r} is invalid: one of {SOURCES} is accepted")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} is invalid: at least 1 prompt per step is accepted")
        self.domain, self.data_dir, self.train_split = domain, data_dir, train_split
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.train_examples: list[MCQExample] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.train_examples:
            self.train_examples = load_sciknoweval(self.data_dir, self.domain, self.train_split)
        if len(self.train_examples) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {len(self.train_examples)} examples of "
                f"{self.domain}/{self.train_split}"
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
