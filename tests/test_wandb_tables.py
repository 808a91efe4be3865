"""Evaluation samples reach W&B as one table per dataset: prompt, response, parsed answer, correct."""

import json

from lightning.pytorch.loggers import CSVLogger, WandbLogger

from demopsd.data.types import MCQExample
from demopsd.evaluation.runner import SAMPLE_COLUMNS, log_sample_tables


class RecordingWandbLogger(WandbLogger):
    def __init__(self) -> None:  # no W&B run: only what log_table receives
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


def test_each_question_first_answer_is_a_row_of_its_datasets_table(tmp_path):
    datasets = {"bio": [MCQExample("Q0?", "A", "sys", 0, "ABCD"), MCQExample("Q1?", "C", "sys", 1, "ABCD")],
                "gpqa": [MCQExample("G7?", "B", "sys", 7, "ABCD")]}
    records = [
        {"dataset": "bio", "idx": 0, "answer": "A", "samples": [
            {"text": "<answer>A</answer>", "predicted": "A", "correct": True},
            {"text": "second sample", "predicted": None, "correct": False}]},
        {"dataset": "bio", "idx": 1, "answer": "C", "samples": [{"text": "B", "predicted": "B", "correct": False}]},
        {"dataset": "gpqa", "idx": 7, "answer": "B", "samples": [{"text": "b", "predicted": "B", "correct": True}]},
    ]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    wandb_logger, csv_logger = RecordingWandbLogger(), CSVLogger(tmp_path)

    log_sample_tables([csv_logger, wandb_logger], samples, datasets, step=8)

    assert [(key, step) for key, _, _, step in wandb_logger.tables] == [("eval/bio/samples", 8), ("eval/gpqa/samples", 8)]
    _, columns, bio, _ = wandb_logger.tables[0]
    assert columns == SAMPLE_COLUMNS
    assert bio == [[8, "bio", 0, "Q0?", "A", "<answer>A</answer>", "A", True], [8, "bio", 1, "Q1?", "C", "B", "B", False]]
    assert wandb_logger.tables[1][2] == [[8, "gpqa", 7, "G7?", "B", "b", "B", True]]
