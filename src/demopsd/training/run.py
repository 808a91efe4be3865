"""From a run's typed settings to a finished run: build the pieces, fit, say where everything went."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import numpy as np
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from demopsd.config.methods import METHODS
from demopsd.config.run import TrainSettings
from demopsd.data.datamodule import PromptDataModule
from demopsd.evaluation.runner import PeriodicEvaluation, periodic_evaluation
from demopsd.report.plots import write_report
from demopsd.report.summary import run_summary
from demopsd.rollout.backends import engine_factory
from demopsd.runtime.checkpoints import CHECKPOINT_DIR, FINAL_MODEL_DIR, AtomicCheckpointIO
from demopsd.runtime.loggers import finish_wandb, make_wandb_logger, quiet_known_notices
from demopsd.runtime.models import WARMED_MODEL, load_model_and_tokenizer
from demopsd.runtime.provenance import write_provenance
from demopsd.runtime.resume import (
    RunStateCheckpoint,
    continue_csv_log,
    kept_metrics_lines,
    read_run_state,
    resolve_checkpoint,
)
from demopsd.runtime.sharding import save_pretrained, shards_the_model
from demopsd.training.guards import NumericalGuard
from demopsd.training.module import SelfDistillationModule
from demopsd.training.timing import TimedModelCheckpoint
from demopsd.training.warmup import build_warmed_model

log = logging.getLogger(__name__)

def build_module(settings: TrainSettings, policy, tokenizer) -> SelfDistillationModule:
    """The LightningModule of ``settings``, around the step the method registry names for its method's kind."""
    step = hydra.utils.get_class(METHODS[settings.method.kind].step).from_settings(policy, tokenizer, settings)
    return SelfDistillationModule(
        policy,
        tokenizer,
        step,
        settings.rollout,
        optim=settings.optim,
        prompts=settings.prompts,
        make_rollout_engine=engine_factory(
            settings.rollout, policy, tokenizer, max_model_len=settings.max_model_len, seed=settings.seed
        ),
        sharding=settings.fsdp,
        updates_per_batch=settings.updates_per_batch,
        memory=settings.memory,
    )


def build_loggers(settings: TrainSettings, output_dir: Path, resumed_state: dict | None = None) -> list[Logger]:
    """``metrics.csv`` in the run directory (flushed every step), plus W&B unless disabled.

    ``resumed_state``: for a resumed run, the :class:`RunStateCheckpoint` state of its checkpoint (empty for a
    checkpoint without one); its ``metrics.csv`` rows up to the checkpoint are kept and its W&B run continues.
    """
    csv_logger = CSVLogger(save_dir=output_dir, name="", version="", flush_logs_every_n_steps=1)
    if resumed_state is not None:
        kept = kept_metrics_lines(
            output_dir / "metrics.csv", resumed_state.get("metrics_csv_lines"), resumed_state.get("global_step")
        )
        continue_csv_log(csv_logger, kept)
    resumed_state = resumed_state or {}
    loggers: list[Logger] = [csv_logger]
    if settings.logger.wandb.enabled:
        wandb_logger = make_wandb_logger(
            settings.logger.wandb,
            save_dir=output_dir,
            run_name=f"{settings.run_name}_{output_dir.name}",
            config=settings.resolved,
            run_id=resumed_state.get("wandb_run_id"),
        )
        if wandb_logger is not None:
            loggers.append(wandb_logger)
    return loggers


def run(settings: TrainSettings) -> dict[str, float]:
    """Train as ``settings`` say (:func:`demopsd.config.check.validate_config` builds them from the composed config);
    returns the last logged value of every training and evaluation metric."""
    quiet_known_notices()
    paths, resume = settings.paths, None
    if settings.ckpt_path is not None:
        resume = resolve_checkpoint(settings.ckpt_path, Path(paths.log_dir) / settings.task_name / "runs",
                                    settings.run_name)
    output_dir = resume.run_dir if resume else Path(paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_state = read_run_state(resume.checkpoint) if resume else None
    record_run_start(settings, output_dir, resume.checkpoint if resume else None)
    L.seed_everything(settings.seed, workers=True)

    model = settings.model
    if model.name_or_path == WARMED_MODEL:
        build_warmed_model(paths.cache_dir)  # once: every later run reads it from the cache
    # under trainer=fsdp only global rank 0 reads the weights; configure_model fills every process's shards from them
    policy, tokenizer = load_model_and_tokenizer(
        model.name_or_path, cache_dir=paths.cache_dir, dtype=model.dtype, sharded=shards_the_model(settings.trainer)
    )
    module = build_module(settings, policy, tokenizer)
    datamodule = PromptDataModule(settings.data, data_dir=paths.data_dir, seed=settings.seed, tokenizer=tokenizer,
                                  chat_template_kwargs=settings.prompts.chat_template_kwargs)
    evaluation = periodic_evaluation(settings, output_dir / "eval")
    trainer: L.Trainer = hydra.utils.instantiate(
        settings.trainer,
        logger=build_loggers(settings, output_dir, run_state),
        callbacks=build_callbacks(settings, output_dir, evaluation),
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=settings.checkpoint.every_n_train_steps > 0,
        default_root_dir=output_dir,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume.checkpoint if resume else None)

    if settings.checkpoint.save_final_model:
        save_pretrained(module.policy, tokenizer, output_dir / FINAL_MODEL_DIR, is_global_zero=trainer.is_global_zero)
    final = {**{k: float(v) for k, v in trainer.logged_metrics.items()}, **evaluation.last_metrics}
    finish_wandb(trainer.loggers)
    if trainer.is_global_zero:
        print_summary(output_dir)
    log.info(
        "Run finished after %d training steps. Outputs in %s: metrics.csv, %sconfig_resolved.yaml, "
        "provenance.json, report/%s%s",
        trainer.global_step,
        output_dir,
        "checkpoints/, " if settings.checkpoint.every_n_train_steps else "",
        ", model/" if settings.checkpoint.save_final_model else "",
        ", wandb/" if any(not isinstance(lg, CSVLogger) for lg in trainer.loggers) else "",
    )
    return final


def build_callbacks(settings: TrainSettings, output_dir: Path, evaluation: PeriodicEvaluation) -> list[L.Callback]:
    """The callbacks every run needs (checkpoints, ``evaluation``, numerical guards, process seeds, resume state),
    then the optional ones of ``callbacks`` (the progress bar only while ``trainer.enable_progress_bar``)."""
    checkpoint = settings.checkpoint
    required = [
        *checkpointing(checkpoint.every_n_train_steps, output_dir / CHECKPOINT_DIR, checkpoint.keep),
        evaluation,
        NumericalGuard(settings.guards),
        ProcessSeeds(settings.seed),
        RunStateCheckpoint(output_dir / "metrics.csv"),
    ]
    progress = settings.trainer.get("enable_progress_bar", True)
    optional = [hydra.utils.instantiate(spec) for spec in settings.callbacks.values()]
    return required + [c for c in optional if progress or not isinstance(c, ProgressBar)]


@rank_zero_only
def record_run_start(settings: TrainSettings, output_dir: Path, resumed_from: Path | None) -> None:
    """``config_resolved.yaml`` and ``provenance.json`` for a new run; for a resumed one, a warning about every
    changed key and ``provenance_resumed_<checkpoint>.json``. Only the first process writes."""
    if resumed_from is None:
        OmegaConf.save(OmegaConf.create(settings.resolved), output_dir / "config_resolved.yaml")
        write_provenance(output_dir / "provenance.json", settings.paths.root_dir)
        return
    warn_about_changed_config(output_dir / "config_resolved.yaml", settings.resolved)
    write_provenance(output_dir / f"provenance_resumed_{resumed_from.stem}.json", settings.paths.root_dir)
    log.info("Resuming from %s; outputs continue in %s", resumed_from, output_dir)


class ProcessSeeds(L.Callback):
    """Gives every process after the first its own random stream, derived from ``seed`` and its rank, so that
    the processes do not sample their rollouts with the same random numbers. The first process keeps the
    stream ``seed`` started, so a run's first process samples as a single-process run does."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.global_rank > 0:
            seed_everything(process_seed(self.seed, trainer.global_rank), workers=True, verbose=False)


def process_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for process ``rank`` of a run seeded with ``seed``, unrelated to other runs' seeds."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def checkpointing(every_n_train_steps: int, dirpath: Path, keep: int = -1) -> list[TimedModelCheckpoint]:
    """A checkpoint every ``every_n_train_steps`` training steps and at the end, with ``last.ckpt`` linking the
    newest; none at all for 0 (the run then cannot be resumed). Their work is timed as each step's
    ``checkpoint`` phase. ``keep``: how many stay on disk, the newest
    (``-1``: all)."""
    if every_n_train_steps == 0:
        return []
    return [
        TimedModelCheckpoint(
            dirpath=dirpath,
            filename="step{step:06d}",
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps,
            monitor="step",  # the newest are the "best": keeping the top `keep` keeps the last ones
            mode="max",
            save_top_k=keep,
            save_last="link",
            enable_version_counter=False,  # a resumed run replaces `last.ckpt` instead of adding `last-v1.ckpt`
        )
    ]


def warn_about_changed_config(saved: Path, resolved: dict) -> None:
    """Warn about every key whose value differs between the run's saved config and ``resolved`` (the resolved
    config of its resumption)."""
    if not saved.is_file():
        return
    before = _flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    now = _flatten(resolved)
    ignored = {"ckpt_path", "paths.output_dir"}
    changed = sorted(k for k in before.keys() | now.keys() if k not in ignored and before.get(k) != now.get(k))
    if changed:
        log.warning(
            "The resumed run's config differs from %s in: %s",
            saved,
            "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed),
        )


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def print_summary(output_dir: Path) -> None:
    """Plots and tables into ``output_dir/report``, then :func:`run_summary` on the console; a plot that fails
    costs a warning, never the finished run."""
    report_dir = output_dir / "report"
    try:
        write_report(output_dir, report_dir)
    except Exception as error:  # noqa: BLE001 - the run itself is done and saved
        log.warning("The report of %s failed (%s); `python src/report.py %s` retries it", output_dir, error, output_dir)
        report_dir = None
    summary = run_summary(output_dir / "metrics.csv", report_dir)
    if summary:
        print(summary)
