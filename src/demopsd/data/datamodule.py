"""Prompts for training: a shuffled, seeded stream of multiple-choice examples in batches of prompts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from demopsd.config.sections import DataConfig
from demopsd.data.loading import load_split
from demopsd.data.types import LoadedSplit, MCQExample, render_prompt, student_conversation

log = logging.getLogger(__name__)
SKIPPED_ROWS_METRIC = "data/skipped_rows"


class PromptDataModule(L.LightningDataModule):
    """Batches of ``data.batch_size`` examples (a plain list each) from the ``data.train_split`` of ``data``.

    The order is drawn from a generator seeded with ``seed``, so the same seed gives the same batches; a run
    resumed from a checkpoint continues with the batch its step would have had (:class:`StepIndexedBatches`).
    ``skipped_rows`` counts the bad rows of the split left out under ``data.on_bad_row=skip``; ``train_dataloader``
    logs it once as ``data/skipped_rows`` (step 0) to the trainer's loggers, and prints a notice when it is not 0.

    Every epoch has ``len(train_examples) // data.batch_size`` steps: a last, incomplete batch is dropped (the
    reference's ``drop_last=True``), so ``trainer.max_epochs`` counts whole batches as the reference's epochs do.

    Prompts longer than ``data.max_prompt_tokens`` (rendered with ``tokenizer``'s chat template and
    ``chat_template_kwargs``) are left out with a warning giving their number under ``data.on_long_prompt=filter``
    (the reference filters them), or stop the run naming the first under ``error``. ``tokenizer`` and
    ``chat_template_kwargs`` default to the attached LightningModule's ``tokenizer`` and
    ``prompts.chat_template_kwargs``; with no tokenizer at all, lengths are not checked when the data loads (the
    training step still refuses an over-long prompt).
    """

    def __init__(
        self,
        data: DataConfig,
        *,
        data_dir: str | Path | None,
        seed: int = 0,
        tokenizer=None,
        chat_template_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__()
        self.on_long_prompt = data.on_long_prompt
        self.data, self.data_dir, self.seed = data, data_dir, seed
        self.tokenizer, self.chat_template_kwargs = tokenizer, chat_template_kwargs
        self.batch_size, self.num_workers = data.batch_size, data.num_workers
        self.train_examples: list[MCQExample] = []
        self.skipped_rows = 0
        self._skipped_rows_logged = False

    def setup(self, stage: str | None = None) -> None:
        if not self.train_examples:
            loaded = load_split(self.data, self.data.train_split, self.data_dir)
            self.skipped_rows = getattr(loaded, "skipped", 0)
            if self.skipped_rows:
                print(
                    f"Notice: skipped {self.skipped_rows} bad rows of {self.data.name}/{self.data.train_split} "
                    f"(data.on_bad_row=skip; the warning above lists why); training on {len(loaded)}"
                )
            self.train_examples = self._within_prompt_limit(loaded)
        if len(self.train_examples) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {len(self.train_examples)} examples of "
                f"{self.data.name}/{self.data.train_split}"
            )

    def _within_prompt_limit(self, examples: LoadedSplit) -> list[MCQExample]:
        """``examples`` whose rendered prompt has at most ``data.max_prompt_tokens`` tokens, the others handled as
        ``data.on_long_prompt`` says; all of them when there is no limit or no tokenizer to count with."""
        limit = self.data.max_prompt_tokens
        module = getattr(self.trainer, "lightning_module", None)  # None without a trainer
        tokenizer = self.tokenizer or getattr(module, "tokenizer", None)
        if limit is None or tokenizer is None or not examples:
            return examples
        kwargs = self.chat_template_kwargs
        if kwargs is None:
            kwargs = getattr(getattr(module, "prompts", None), "chat_template_kwargs", None)
        texts = [render_prompt(tokenizer, student_conversation(e), kwargs) for e in examples]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        long = [(e, n) for e, n in zip(examples, lengths) if n > limit]
        where = f"{self.data.name}/{self.data.train_split}"
        if long and self.on_long_prompt == "error":
            example, length = long[0]
            raise ValueError(
                f"{len(long)} of the {len(examples)} prompts of {where} have more than data.max_prompt_tokens={limit} "
                f"tokens, the first idx {example.idx} with {length}; raise data.max_prompt_tokens, or set "
                f"data.on_long_prompt=filter to leave them out"
            )
        if long:
            log.warning(
                "left out %d of the %d prompts of %s: longer than data.max_prompt_tokens=%d tokens "
                "(data.on_long_prompt=filter; the longest has %d)",
                len(long), len(examples), where, limit, max(n for _, n in long),
            )
        return [e for e, n in zip(examples, lengths) if n <= limit]

    def _log_skipped_rows(self) -> None:
        """``data/skipped_rows`` to every logger of the attached trainer, once (nothing without a trainer)."""
        trainer = self.trainer
        if self._skipped_rows_logged or trainer is None or not trainer.loggers:
            return
        for logger in trainer.loggers:
            logger.log_metrics({SKIPPED_ROWS_METRIC: float(self.skipped_rows)}, step=0)
        self._skipped_rows_logged = True
        log.info("%s=%d (%s/%s)", SKIPPED_ROWS_METRIC, self.skipped_rows, self.data.name, self.data.train_split)

    def state_dict(self) -> dict:
        return {"skipped_rows_logged": self._skipped_rows_logged}

    def load_state_dict(self, state_dict: dict) -> None:  # a resumed run: logged by the run it continues
        self._skipped_rows_logged = state_dict.get("skipped_rows_logged", False)

    def _global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        self._log_skipped_rows()  # here, not in `setup`: a resumed run has restored `state_dict` by now
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        batches = StepIndexedBatches(
            len(self.train_examples), self.batch_size, self.seed, start=self._global_step, rank=rank,
            world_size=world_size,
        )
        return DataLoader(
            self.train_examples,
            batch_sampler=batches,
            collate_fn=list,
            generator=torch.Generator().manual_seed(self.seed),  # so that loading draws nothing from the global RNG
            num_workers=self.num_workers,
        )


class StepIndexedBatches(Sampler[list[int]]):
    """Batches of indices into ``num_examples`` examples, one per training step, in seeded epochs.

    The stream is a sequence of epochs, each a permutation of ``range(num_examples)`` drawn from a generator
    seeded with (``seed``, epoch) and cut into ``len(self)`` batches of ``batch_size`` (the remainder is
    dropped). Batch ``s`` of the stream belongs to step ``s``. Each iteration yields the rest of the epoch
    that holds step ``start()``, so a run resumed at step ``s`` gets exactly the batches an uninterrupted run
    would have had from there, with none repeated or skipped. ``start`` is read when iteration begins (after
    Lightning has restored the step counter from a checkpoint); it assumes one batch per training step.

    With ``world_size`` processes (DDP) ``batch_size`` is the number of prompts per training step over all
    of them: process ``rank`` gets every ``world_size``-th prompt of each batch from ``rank`` on, so the
    processes share the step's prompts without overlap and a run sees the same prompts however many
    processes it has.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        seed: int,
        start: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or num_examples < batch_size:
            raise ValueError(f"batch_size={batch_size} needs 1 <= batch_size <= num_examples={num_examples}")
        if batch_size % world_size:
            raise ValueError(
                f"data.batch_size={batch_size} does not split over {world_size} processes: a multiple of "
                f"{world_size} is accepted (it is the number of prompts per training step over all processes)"
            )
        self.num_examples, self.batch_size, self.seed, self.start = num_examples, batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.num_examples // self.batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation ``[num_examples]`` of epoch ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = divmod(self.start(), len(self))
        order = self.epoch_order(epoch)
        for batch in range(first, len(self)):
            step_batch = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield step_batch[self.rank :: self.world_size].tolist()
