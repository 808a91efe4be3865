"""Evaluation from a config: the datasets it names, the policy it points at, during training and on its own."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demopsd.config.run import EvalRunSettings, TrainSettings
from demopsd.config.sections import DataConfig, EvalSettings
from demopsd.config.settings import EvalConfig
from demopsd.data.loading import load_split
from demopsd.data.types import MCQExample
from demopsd.evaluation.evaluate import (
    batch_seed,
    combine,
    eval_questions,
    evaluate_batches,
    num_batches,
    write_results,
)
from demopsd.evaluation.metrics import changes_from
from demopsd.rollout.engine import GenerateEngine, RolloutEngine
from demopsd.runtime.checkpoints import (
    CHECKPOINT_DIR,
    FINAL_MODEL_DIR,
    is_checkpoint,
    load_policy_weights,
    newest_checkpoint,
)
from demopsd.runtime.loggers import wandb_loggers
from demopsd.runtime.models import load_model_and_tokenizer
from demopsd.runtime.provenance import write_provenance
from demopsd.runtime.randomness import random_states_kept
from demopsd.runtime.sharding import gathered

log = logging.getLogger(__name__)

def eval_datasets(data: DataConfig, evaluation: EvalSettings, data_dir: str | None) -> dict[str, list[MCQExample]]:
    """Dataset name → examples: the held-out data of ``data`` (if ``eval.in_domain``) and every ``eval.ood`` entry.

    The held-out data is the test split, or, for a ``data=`` config with ``held_out`` sets (the synthetic
    mix), the test split of each of them, reported separately. Bad rows follow each entry's ``on_bad_row``;
    ``data.on_bad_row=skip`` (what the error message suggests) skips them in the ``eval.ood`` datasets too.
    """
    in_domain = list(getattr(data, "held_out", {}).values()) or [data]
    on_bad_row = "skip" if data.on_bad_row == "skip" else None  # None: the entry's own setting
    return {
        entry.name: load_split(entry, entry.test_split, data_dir, on_bad_row=on_bad_row)
        for entry in [*(in_domain if evaluation.in_domain else []), *evaluation.ood.values()]
    }


def run_all(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    datasets: dict[str, list[MCQExample]],
    config: EvalConfig,
    out_dir: Path,
    *,
    seed: int,
    chat_template_kwargs: dict | None = None,
    progress: bool = True,
    rollout_engine: RolloutEngine | None = None,
    **context,
) -> dict[str, float]:
    """Evaluate on every dataset, write ``summary.json`` / ``samples.jsonl`` to ``out_dir``, return the metrics.

    In a ``torch.distributed`` group every process evaluates a share of the ``generate`` batches (those of all
    the datasets, dealt in turn) and sends its records to the first process, which summarises them and writes
    the files; every process returns the metrics. No process waits in a collective while another generates,
    and each generates alone (a sharded policy is gathered by the caller), so shares of unequal size are fine.
    Batch ``i`` of dataset ``d`` samples after ``torch.manual_seed(batch_seed(seed, d, i))`` on a forked random
    state: the same weights, settings and seed give the same answers in any number of processes, and the
    caller's random stream is left as it was. ``context`` (the training step, say) goes into ``summary.json``.
    """
    datasets = {name: eval_questions(examples, name, config) for name, examples in datasets.items()}
    rank, world = process_rank()
    plan = [(name, i) for name, examples in datasets.items() for i in range(num_batches(examples, config))]
    mine = plan[rank::world]
    engine = rollout_engine or GenerateEngine(policy, tokenizer)
    with random_states_kept():  # the caller's (training) stream does not depend on evaluation
        share = {
            name: evaluate_batches(
                policy, tokenizer, examples, name, config, [i for d, i in mine if d == name],
                seeds=functools.partial(batch_seed, seed, name),
                chat_template_kwargs=chat_template_kwargs, progress=progress, rollout_engine=engine,
            )
            for name, examples in datasets.items()
        }
    shares = gather_to_first(share)
    metrics = None
    if shares is not None:
        batches = {name: {i: batch for s in shares for i, batch in s[name].items()} for name in datasets}
        results = [combine(name, [batches[name][i] for i in sorted(batches[name])], config.k) for name in datasets]
        write_results(results, out_dir, config, **context)
        metrics = {name: value for result in results for name, value in result.metrics.items()}
    return from_first(metrics)


def process_rank() -> tuple[int, int]:
    """This process's rank and the number of processes in the ``torch.distributed`` group ((0, 1) outside one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_to_first(value: object) -> list | None:
    """Every process's ``value``, in rank order, on the first process; None on the others."""
    rank, world = process_rank()
    if world == 1:
        return [value]
    gathered_values = [None] * world if rank == 0 else None
    torch.distributed.gather_object(value, gathered_values, dst=0)
    return gathered_values


def from_first(value: object) -> object:
    """The first process's ``value``, on every process."""
    if process_rank()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


class PeriodicEvaluation(L.Callback):
    """Evaluates the policy before training, every ``every_n_steps`` training steps and after the last one.

    Metrics go to every logger at the training step they describe (0 = the starting model); the
    per-question samples go to ``<out_dir>/step<NNNNNN>/``. Sampling is seeded with ``seed + step`` (each batch
    of questions from it, the dataset and the batch: :func:`run_all`) on a forked random state, so evaluating
    or not leaves the training run unchanged, and the answers do not depend on the number of processes. With
    ``at_start`` the :data:`~demopsd.evaluation.metrics.CHANGE_METRICS` are also logged as changes from the
    starting model (its own biases are not what training did); that baseline is kept in checkpoints.
    """

    def __init__(
        self,
        datasets: dict[str, list[MCQExample]],
        config: EvalConfig,
        out_dir: Path,
        *,
        every_n_steps: int = 0,
        at_start: bool = False,
        at_end: bool = True,
        chat_template_kwargs: dict | None = None,
        seed: int = 0,
    ) -> None:
        self.datasets, self.config, self.out_dir = datasets, config, Path(out_dir)
        self.every_n_steps, self.at_start, self.at_end = every_n_steps, at_start, at_end
        self.chat_template_kwargs, self.seed = chat_template_kwargs, seed
        self.last_step: int | None = None
        self.baseline: dict[str, float] | None = None
        self.last_metrics: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and self.last_step != trainer.global_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every process evaluates its share of the questions (:func:`run_all`), under ``trainer=fsdp`` on the
        weights they first gather together; the first process writes, logs and prints, and every process keeps
        the same :attr:`last_metrics`. The seconds are logged as ``perf/eval_seconds`` and left out of the
        training step's time."""
        step = trainer.global_step
        self.last_step = step
        if not self.datasets:
            return
        started = time.perf_counter()
        engine = pl_module.rollout_engine
        engine.sync()
        out_dir = self.out_dir / f"step{step:06d}"
        with gathered(pl_module.policy):
            metrics = run_all(
                pl_module.policy, pl_module.tokenizer, self.datasets, self.config, out_dir, seed=self.seed + step,
                chat_template_kwargs=self.chat_template_kwargs, progress=False, step=step, rollout_engine=engine,
            )
        if step == 0 and self.baseline is None:
            self.baseline = metrics
        self.last_metrics = from_first({  # the first process's seconds on every process
            **metrics,
            **changes_from(self.baseline or {}, metrics),
            "perf/eval_seconds": time.perf_counter() - started,
        })
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=step)
                logger.save()
            log_sample_tables(trainer.loggers, out_dir / "samples.jsonl", self.datasets, step)
            log.info("step %d: %s (samples in %s)", step, format_accuracies(self.last_metrics), out_dir)
        pl_module.clock.exclude(time.perf_counter() - started)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state_dict: dict) -> None:
        self.baseline = state_dict.get("baseline")


SAMPLE_COLUMNS = ["step", "dataset", "idx", "prompt", "answer", "response", "parsed answer", "correct"]


def log_sample_tables(loggers, samples_file: Path, datasets: dict[str, list[MCQExample]], step: int) -> None:
    """One W&B table per dataset, ``eval/<dataset>/samples``: each answered question's first sampled answer, parsed
    and scored (the k samples of every question stay in ``samples.jsonl``; questions only probed have none)."""
    targets = wandb_loggers(loggers)
    if not targets or not samples_file.is_file():
        return
    prompts = {(name, e.idx): e.prompt for name, examples in datasets.items() for e in examples}
    rows: dict[str, list[list]] = {}
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "samples" not in record:
            continue
        first = record["samples"][0]
        rows.setdefault(record["dataset"], []).append([
            step, record["dataset"], record["idx"], prompts.get((record["dataset"], record["idx"]), ""),
            record["answer"], first["text"], first["predicted"], first["correct"],
        ])
    for logger in targets:
        for dataset, data in rows.items():
            logger.log_table(key=f"eval/{dataset}/samples", columns=SAMPLE_COLUMNS, data=data, step=step)


def periodic_evaluation(settings: TrainSettings, out_dir: Path) -> PeriodicEvaluation:
    """The training run's evaluation callback, as ``settings.eval`` says; its datasets are read now, so a missing
    file fails fast."""
    evaluation = settings.eval
    return PeriodicEvaluation(
        eval_datasets(settings.data, evaluation, settings.paths.data_dir) if evaluation.scheduled else {},
        evaluation,
        out_dir,
        every_n_steps=evaluation.every_n_steps,
        at_start=evaluation.at_start,
        at_end=evaluation.at_end,
        chat_template_kwargs=settings.prompts.chat_template_kwargs,
        seed=settings.seed,
    )


def format_accuracies(metrics: dict[str, float]) -> str:
    shown = {k: v for k, v in metrics.items() if "acc" in k or "pass@" in k}
    return ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in shown.items())


def load_policy(settings: EvalRunSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The policy ``ckpt_path`` points at, and a description of it.

    ``ckpt_path``: null (the base model ``model.name_or_path``), a Hugging Face model directory (a
    training run's ``model/``), a training run directory (its ``model/``, else its newest checkpoint, as a resumed
    run picks it: :func:`demopsd.runtime.checkpoints.newest_checkpoint`), or a Lightning checkpoint: a ``.ckpt``
    file or, from ``trainer=fsdp``, a sharded ``.ckpt`` directory (the base model with the checkpoint's policy
    weights).
    """
    model_settings = settings.model
    load = dict(cache_dir=settings.paths.cache_dir, dtype=model_settings.dtype)
    if settings.ckpt_path is None:
        return *load_model_and_tokenizer(model_settings.name_or_path, **load), model_settings.name_or_path
    path = Path(settings.ckpt_path).expanduser()
    if path.is_dir() and not (path / "config.json").exists() and not is_checkpoint(path):
        if (path / FINAL_MODEL_DIR / "config.json").exists():
            path = path / FINAL_MODEL_DIR
        elif newest_checkpoint(path) is not None:
            path = newest_checkpoint(path)
        else:
            raise FileNotFoundError(f"ckpt_path={str(path)!r} holds neither model/ nor a checkpoint in {CHECKPOINT_DIR}/")
    if path.is_dir() and not is_checkpoint(path):
        return *load_model_and_tokenizer(str(path), **load), str(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r} does not exist: give a run directory, a model directory or a .ckpt file"
        )
    model, tokenizer = load_model_and_tokenizer(model_settings.name_or_path, **load)
    load_policy_weights(model, path)
    return model, tokenizer, str(path)


def eval_device(choice: str) -> torch.device:
    """Where ``python src/eval.py`` decodes, as its ``device`` key says: ``cuda``, ``cpu``, or ``auto`` (CUDA
    where torch has it, else the CPU). Asking for CUDA where there is none is an error naming the key."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise ValueError("device=cuda, but torch finds no CUDA device on this machine: device=auto or device=cpu "
                         "evaluates on the CPU")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and cuda) else "cpu")


def run_evaluation(settings: EvalRunSettings) -> dict[str, float]:
    """``python src/eval.py``: evaluate the policy ``settings`` name on the device they name; results land in the
    Hydra run directory."""
    device = eval_device(settings.device)
    output_dir = Path(settings.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(settings.resolved), output_dir / "config_resolved.yaml")
    write_provenance(output_dir / "provenance.json", settings.paths.root_dir)
    datasets = eval_datasets(settings.data, settings.eval, settings.paths.data_dir)
    if not datasets:
        raise ValueError("nothing to evaluate: eval.in_domain is false and eval.ood is empty")
    policy, tokenizer, source = load_policy(settings)
    log.info("Evaluating %s on %s", source, device)
    metrics = run_all(
        policy.to(device), tokenizer, datasets, settings.eval, output_dir, seed=settings.seed,
        chat_template_kwargs=settings.model.chat_template_kwargs, evaluated=source,
    )
    for name, value in metrics.items():
        log.info("%-48s %.4f", name, value)
    log.info("Evaluation of %s finished. Outputs in %s: summary.json, samples.jsonl", source, output_dir)
    return metrics
