"""Where a training step's time goes: each phase of real steps, before and after the CPU speed-ups of rollouts
(the shared prompt cache, attention without copied key/value heads), beside the same phase measured alone.

    python bench/step_breakdown.py                                  # the default job (experiment=leakage_laptop)
    python bench/step_breakdown.py --steps 3 debug=smoke           # any training overrides
    python bench/step_breakdown.py rollout=vllm rollout.kv_cache_memory_bytes=1000000000

The job runs twice in this process from the same weights and seed, ``--steps`` optimizer steps each, with nothing
else (no evaluation, no final model): *before*, with both speed-ups turned off (``generate`` reads each prompt once
per response, and attention copies each key/value head for every query head it serves, as transformers' ``"sdpa"``
does); *after*, the code as it is. Each column is the mean of ``perf/<phase>_seconds`` over the steps
after the first (:mod:`demopsd.training.timing`). *alone* is each phase run outside Lightning, ``--repeats`` times
with the job's first batch, the median: the rollouts, then the method's step (forwards and loss), ``loss.backward()``,
AdamW, the EMA update, and ``torch.save`` of what a checkpoint holds. The last lines give the ratio of the step to the
sum of the phases alone, the rollout speed-up, and how long the rollout engine took to start. Under
``rollout=vllm`` both runs sample through vLLM (its start-up is then the figure to weigh against the rollouts'
seconds saved); only the trainer's attention differs between them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

import demopsd.config.store  # noqa: F401 - the settings' defaults, which conf/ extends
import demopsd.rollout.engine
import demopsd.runtime.models
from demopsd.config.check import validate_config
from demopsd.data.datamodule import PromptDataModule
from demopsd.rollout.scored import scored_rollouts
from demopsd.runtime.models import WARMED_MODEL, load_model_and_tokenizer
from demopsd.training.run import build_module, run
from demopsd.training.steps import StepBatch
from demopsd.training.timing import PHASES, StepClock
from demopsd.training.warmup import build_warmed_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
QUIET = ["eval.at_start=false", "eval.at_end=false", "eval.every_n_steps=0", "checkpoint.save_final_model=false",
         "logger.wandb.mode=disabled", "trainer.enable_progress_bar=false"]


def job_config(overrides: list[str], steps: int, output_dir: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[
            "experiment=leakage_laptop", *overrides, *QUIET, f"trainer.max_steps={steps}",
            f"paths.output_dir={output_dir}",
        ])


def logged_phases(cfg) -> dict[str, float]:
    """Train as ``cfg`` says; the mean of each ``perf/*_seconds`` over its steps after the first."""
    run(validate_config(cfg))
    metrics = pd.read_csv(Path(cfg.paths.output_dir) / "metrics.csv").dropna(subset=["perf/step_seconds"])
    metrics = metrics.iloc[1:] if len(metrics) > 1 else metrics
    return {c.removeprefix("perf/").removesuffix("_seconds"): float(metrics[c].mean())
            for c in metrics if c.startswith("perf/") and c.endswith("_seconds")}


def phases_alone(cfg, repeats: int) -> dict[str, float]:
    """The median seconds of each phase run on its own, outside Lightning, with the job's first batch; and under
    ``start-up``, the seconds the rollout engine took to start (vLLM's; next to nothing for ``generate``)."""
    settings = validate_config(cfg)
    model, paths = settings.model, settings.paths
    if model.name_or_path == WARMED_MODEL:
        build_warmed_model(paths.cache_dir)
    policy, tokenizer = load_model_and_tokenizer(model.name_or_path, cache_dir=paths.cache_dir, dtype=model.dtype)
    module = build_module(settings, policy, tokenizer)
    started = time.perf_counter()
    module.rollout_engine = engine = module.make_rollout_engine(local_rank=0)
    startup = time.perf_counter() - started
    data = PromptDataModule(settings.data, data_dir=paths.data_dir, seed=settings.seed)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = module.configure_optimizers()["optimizer"]
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(repeats):
            clock = StepClock()
            clock.start_step()
            with clock.phase("rollout"):
                rollouts, examples, scores = scored_rollouts(engine, tokenizer, batch, module.sampling, module.prompts)
            step = module.method_step
            step.begin(StepBatch(rollouts, examples, scores, 0))
            rows = range(len(examples))
            for micro_batch in module.micro_batches(rollouts, rows):
                loss = step.micro_batch_loss(rows, micro_batch, clock)
                with clock.phase("backward"):
                    loss.backward()
            step.end()
            with clock.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad()
            engine.policy_updated()
            with clock.phase("ema"):
                module.method_step.after_optimizer_step()
            with clock.phase("checkpoint"):
                torch.save({"state_dict": module.state_dict(), "optimizer": optimizer.state_dict()},
                           Path(scratch) / "step.ckpt")
            for phase, seconds in clock.seconds.items():
                times.setdefault(phase, []).append(seconds)
    return {"start-up": startup, **{phase: statistics.median(values) for phase, values in times.items()}}


def table(before: dict[str, float], after: dict[str, float], alone: dict[str, float]) -> str:
    def cell(values: dict[str, float], phase: str) -> str:
        return f"{values[phase]:.2f}" if phase in values else "–"

    rows = [p for p in PHASES if p in before or p in after or p in alone]
    lines = ["| phase | before s | after s | alone s |", "|-------|---------:|--------:|--------:|"]
    lines += [f"| {p} | {cell(before, p)} | {cell(after, p)} | {cell(alone, p)} |" for p in rows]
    sums = [sum(values.get(p, 0.0) for p in rows) for values in (before, after, alone)]
    lines.append(f"| sum of phases | {sums[0]:.2f} | {sums[1]:.2f} | {sums[2]:.2f} |")
    lines.append(f"| **step** | **{before['step']:.2f}** | **{after['step']:.2f}** | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each run (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each phase alone (the median is shown)")
    parser.add_argument("overrides", nargs="*", help="training config overrides, as for src/train.py")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        with (mock.patch.object(demopsd.rollout.engine, "shared_prompt_cache", lambda *args: None),
              mock.patch.object(demopsd.runtime.models, "use_grouped_sdpa", lambda model: None)):
            before = logged_phases(job_config(args.overrides, args.steps, Path(out) / "before"))
        config = job_config(args.overrides, args.steps, Path(out) / "after")
        after = logged_phases(config)
        alone = phases_alone(config, args.repeats)

    settings = validate_config(config)
    sampling = settings.rollout
    print(f"{config.model.name_or_path} ({config.model.dtype}), method={config.method.name}, "
          f"rollout={settings.rollout.backend}: {config.data.batch_size} prompts x {sampling.n} rollouts of up to "
          f"{sampling.max_new_tokens} tokens; {platform.machine()} CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; means over steps 2-{args.steps}, alone: median of {args.repeats}")
    startup = alone.pop("start-up")
    print(table(before, after, alone))
    floor = sum(alone.values())
    print(f"step / sum of the phases alone: before {before['step'] / floor:.2f}x, after {after['step'] / floor:.2f}x")
    print(f"rollout speed-up (before / after): {before['rollout'] / after['rollout']:.2f}x; "
          f"step: {before['step'] / after['step']:.2f}x; the rollout engine started in {startup:.1f} s")


if __name__ == "__main__":
    main()
