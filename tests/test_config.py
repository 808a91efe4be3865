"""Every method × dataset composes, and its objective / sampling / reprompt settings build and validate."""

import dataclasses
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from demopsd.config.objectives import DistillationConfig, GRPOConfig
from demopsd.config.settings import EvalConfig, RepromptConfig
from tests.helpers import CONFIG_DIR, REPO_ROOT

METHODS = sorted(path.stem for path in (CONFIG_DIR / "method").glob("*.yaml"))
"""Every method of conf/method/ (the registry's kinds are in demopsd.config.methods.METHODS)."""
DATASETS = [f"sciknoweval/{d}" for d in ("biology", "chemistry", "material", "physics")] + [f"synthetic/{k}" for k in ("mixed", "inferable", "uninferable")]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_dataset_composes(method, dataset):
    cfg = compose_train([f"method={method}", f"data={dataset}"])
    assert cfg.method.name == method
    source, option = dataset.split("/")
    assert cfg.data.source == source and cfg.data.batch_size >= 1
    assert cfg.data.get("domain", cfg.data.get("kind")) == option
    if cfg.method.kind == "grpo":
        GRPOConfig(**cfg.method.objective)
    else:
        DistillationConfig(**cfg.method.objective)
        RepromptConfig(**cfg.method.reprompt)


def test_sdpo_has_the_published_defaults():
    cfg = compose_train(["method=sdpo"])
    objective = DistillationConfig(**cfg.method.objective)
    assert (objective.top_k, objective.tail_bucket, objective.alpha, objective.is_clip) == (100, True, 0.5, 2.0)
    assert (objective.blend, objective.lambda_max) == ("constant", 1.0)
    assert (cfg.method.teacher, cfg.method.ema_rate) == ("ema", 0.05)


def test_methods_differ_where_the_table_says():
    demopsd, sdpo, opsd = (compose_train([f"method={m}"]).method for m in ("demopsd", "sdpo", "opsd"))
    assert demopsd.objective.blend != "constant" and sdpo.objective.blend == "constant"
    # DemoPSD and SDPO differ only in the target
    same = {k for k in demopsd.objective if demopsd.objective[k] == sdpo.objective[k]}
    assert set(demopsd.objective) - same == {"blend"}
    assert (opsd.objective.alpha, opsd.objective.top_k, opsd.teacher) == (1.0, None, "live")
    assert opsd.reprompt.use_reference_answer and not opsd.reprompt.use_demonstrations


def test_no_preset_means_the_group_defaults():
    """`python src/train.py method=demopsd data=sciknoweval/biology` means what it says: no preset resizes it."""
    plain = compose_train(["method=demopsd", "data=sciknoweval/biology"])
    assert plain == compose_train(["method=demopsd", "data=sciknoweval/biology", "~experiment"])
    assert (plain.trainer.max_steps, plain.rollout.max_new_tokens, plain.data.batch_size) == (100, 256, 4)


def test_the_laptop_job_is_demopsd_on_the_leakage_task_with_the_answer_shown_to_the_teacher():
    cfg = compose_train(["experiment=leakage_laptop"])
    assert (cfg.method.name, cfg.data.name, cfg.model.name_or_path) == ("demopsd", "synthetic-mixed", "smollm2-135m-instruct-format-warmup")
    assert set(cfg.data.held_out) == {"inferable", "uninferable"}
    for method in ("demopsd", "sdpo", "opsd"):
        assert compose_train([f"method={method}", "experiment=leakage_laptop"]).method.reprompt.use_reference_answer
        assert not compose_train([f"method={method}", "data=sciknoweval/biology"]).method.reprompt.use_reference_answer \
            or method == "opsd"
    assert "reprompt" not in compose_train(["method=grpo"]).method


@pytest.mark.parametrize("experiment, answered, probed", [("leakage_benchmark", 64, 200), ("leakage_laptop", 32, 100)])
def test_the_leakage_jobs_evaluate_balanced_questions_generated_from_their_seed(experiment, answered, probed):
    """The benchmark probes 200 held-out questions of each kind and samples 4 answers to 64 of them (the laptop job,
    to be quick, 100 and 32), each prefix with as many of each correct letter; each seed its own questions."""
    from collections import Counter

    from demopsd.config.check import validate_config
    from demopsd.evaluation.runner import eval_datasets

    prompts = {}
    for seed in (0, 1):
        settings = validate_config(compose_train([f"experiment={experiment}", f"seed={seed}"]))
        assert settings.data.generator_seed == seed
        datasets = eval_datasets(settings.data, settings.eval, None)
        assert set(datasets) == {"synthetic-inferable", "synthetic-uninferable"}
        for examples in datasets.values():
            assert settings.eval.probed(len(examples)) == probed and len(examples) == 200
            assert settings.eval.answered(len(examples)) == answered and settings.eval.k >= 4
            for n in (answered, probed):
                assert Counter(e.answer for e in examples[:n]) == dict.fromkeys("ABCD", n // 4)
        prompts[seed] = {e.prompt for examples in datasets.values() for e in examples}
    assert len(prompts[0] & prompts[1]) < 20  # a few inferable questions recur by chance; the uninferable never


def test_reprompt_keys_mirror_the_library_defaults():
    """Every reprompting setting is a plain config key, and the YAML defaults are SDPO's (the library's)."""
    overrides = ["method=sdpo", "data=sciknoweval/biology", "method.reprompt.success_threshold=1.0"]
    reprompt = compose_train(overrides).method.reprompt
    assert reprompt.success_threshold == 1.0
    assert RepromptConfig(**{**reprompt, "success_threshold": 0.5}) == RepromptConfig()


def test_plain_keys_override():
    cfg = compose_train(
        ["method.objective.top_k=20", "method.objective.is_clip=3", "method.objective.lambda_max=0.5",
         "rollout.n=8", "rollout.temperature=0.7", "rollout.max_new_tokens=64", "optim.lr=2e-6"]
    )
    assert (cfg.method.objective.top_k, cfg.method.objective.is_clip, cfg.method.objective.lambda_max) == (20, 3, 0.5)
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.optim.lr) == (8, 0.7, 64, 2e-6)


def test_smoke_debug_is_tiny():
    cfg = compose_train(["debug=smoke", "method=sdpo", "data=sciknoweval/chemistry"])
    assert cfg.trainer.max_steps <= 2 and cfg.data.batch_size <= 2 and cfg.rollout.max_new_tokens <= 32


def test_gpu_experiment_shards_a_gpu_model_over_a_node_in_bf16():
    cfg = compose_train(["experiment=sdpo_paper_qwen3_8b", "method=demopsd"])
    assert cfg.model.name_or_path == "Qwen/Qwen3-8B" and cfg.model.dtype == "float32"
    assert cfg.trainer.strategy._target_ == "demopsd.runtime.sharding.FullyShardedStrategy"
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 8 and cfg.data.batch_size % 8 == 0
    assert cfg.fsdp.param_dtype == "bfloat16" and cfg.fsdp.activation_checkpointing


def test_the_paper_presets_run_as_the_reference_runs_them():
    """The SciKnowEval protocol of the reference's scripts: vLLM rollouts in bf16 asleep between generations,
    30 epochs of whole batches, evaluation every 5 steps with 16 samples; GRPO with four updates of 8 prompts at
    lr 1e-6, and its sweep over lr × mini-batch."""
    from demopsd.config.check import validate_config

    sdpo = compose_train(["experiment=sdpo_paper_qwen3_8b", "method=sdpo"])
    settings = validate_config(sdpo)
    assert settings.rollout.backend == "vllm" and settings.rollout.dtype == "bfloat16"
    assert settings.rollout.sleep_level == 2
    assert (sdpo.trainer.max_epochs, sdpo.trainer.max_steps) == (30, -1)
    assert settings.eval.k == 16 and settings.eval.every_n_steps == 5
    assert settings.updates_per_batch == 1 and settings.memory.micro_batch_tokens is not None
    grpo = validate_config(compose_train(["experiment=grpo_paper_qwen3_8b"]))
    assert grpo.method.name == "grpo" and grpo.updates_per_batch == 4 and grpo.optim.lr == 1e-6
    assert grpo.rollout.backend == "vllm" and grpo.eval.k == 16
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        sweep = compose(config_name="train", overrides=["experiment=grpo_paper_sweep"], return_hydra_config=True)
    assert dict(sweep.hydra.sweeper.params) == {"optim.lr": "1.0e-5,1.0e-6", "method.mini_batch_size": "8,32"}
    one_gpu = compose_train(["experiment=qwen3_1_7b_1gpu"])
    assert one_gpu.model.name_or_path == "Qwen/Qwen3-1.7B" and one_gpu.trainer.devices == 1
    assert validate_config(one_gpu).eval.k == 16 and one_gpu.trainer.max_epochs == 30
    for mini_batch_size, updates in ((8, 4), (32, 1)):
        cell = compose_train(["experiment=grpo_paper_sweep", f"method.mini_batch_size={mini_batch_size}"])
        assert validate_config(cell).updates_per_batch == updates


def test_the_leakage_benchmark_sweeps_the_laptop_job_with_more_steps_and_questions():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=leakage_benchmark"], return_hydra_config=True)
    default_job = compose_train(["experiment=leakage_laptop"])
    assert dict(cfg.hydra.sweeper.params) == {"seed": "0,1,2", "method": "opsd,sdpo,demopsd,demopsd_placebo,grpo"}
    assert cfg.trainer.max_steps == 24 and cfg.checkpoint.every_n_train_steps == 0
    assert (cfg.eval.max_examples, cfg.eval.probe_examples, cfg.eval.every_n_steps) == (64, 200, 12)
    assert not cfg.eval.at_start  # the starting model is evaluated once per seed, by src/eval.py
    for section in ("data", "rollout", "optim", "model"):
        assert cfg[section] == default_job[section], section


def test_the_learning_rate_sweep_starts_from_what_src_eval_evaluates_once():
    """The sweep's runs skip the step-0 evaluation; ``src/eval.py experiment=lr_sweep`` evaluates the same model on
    the same questions with the same settings and seed, which is what each run's step 0 would have been."""
    from demopsd.config.check import validate_config, validate_eval_config

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        sweep = compose(config_name="train", overrides=["experiment=lr_sweep"], return_hydra_config=True)
    assert dict(sweep.hydra.sweeper.params) == {"seed": "0", "optim.lr": "1.0e-5,3.0e-6,1.0e-6",
                                                "method": "grpo,demopsd"}
    run = validate_config(compose_train(["experiment=lr_sweep", "seed=2", "optim.lr=1e-6"]))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        start = validate_eval_config(compose(config_name="eval", overrides=["experiment=lr_sweep", "seed=2"]))
    assert not run.eval.at_start and run.eval.at_end and run.trainer["max_steps"] == 24
    assert (start.data, start.model, start.seed) == (run.data, run.model, run.seed)
    assert start.data.generator_seed == 2 and start.eval.probe_examples == 200
    assert all(getattr(start.eval, f.name) == getattr(run.eval, f.name) for f in dataclasses.fields(EvalConfig))


def test_the_sgd_sweep_is_the_learning_rate_sweep_with_sgd():
    """Its runs differ from the lr sweep's only in the optimizer and its rates, so the lr sweep's evaluation of the
    starting model (``results/lr_sweep/start``) is their step 0 too."""
    from demopsd.config.check import validate_config

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        sweep = compose(config_name="train", overrides=["experiment=sgd_sweep"], return_hydra_config=True)
    assert dict(sweep.hydra.sweeper.params) == {"seed": "0", "optim.lr": "0.3,0.1,0.03,0.01", "method": "grpo,demopsd"}
    sgd, adamw = (validate_config(compose_train([f"experiment={name}", "method=grpo", "optim.lr=0.1"]))
                  for name in ("sgd_sweep", "lr_sweep"))
    assert (sgd.optim.name, sgd.optim.momentum, adamw.optim.name) == ("sgd", 0.0, "adamw")
    same_place = {"task_name": adamw.task_name, "logger": adamw.logger}  # where each sweep writes its runs
    assert sgd.task_name == "sgd_sweep" and dataclasses.replace(sgd, optim=adamw.optim, **same_place) == adamw


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "src/train.py", "method=grpo", "data=sciknoweval/physics", "--cfg", "job"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    cfg = OmegaConf.create(out)
    assert cfg.method.name == "grpo" and cfg.data.domain == "physics"


def callbacks_of(*overrides: str, tmp_path) -> list:
    from demopsd.config.check import validate_config
    from demopsd.training.run import build_callbacks

    settings = validate_config(compose_train(["experiment=leakage_laptop", *overrides]))
    return build_callbacks(settings, tmp_path, evaluation=None)


def test_the_progress_bar_is_a_callback_of_the_config_that_can_be_dropped_or_turned_off(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar

    from demopsd.training.progress import StepProgressBar

    def bars(callbacks):
        return [c for c in callbacks if isinstance(c, ProgressBar)]

    assert [type(c) for c in bars(callbacks_of(tmp_path=tmp_path))] == [StepProgressBar]
    for overrides in (["trainer.enable_progress_bar=false"], ["~callbacks.progress_bar"], ["callbacks=none"]):
        callbacks = callbacks_of(*overrides, tmp_path=tmp_path)
        assert bars(callbacks) == [], overrides
        L.Trainer(callbacks=[c for c in callbacks if c is not None], enable_progress_bar=False, logger=False)
    added = callbacks_of("+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
                         tmp_path=tmp_path)
    assert sum(isinstance(c, LearningRateMonitor) for c in added) == 1 and len(bars(added)) == 1


def test_the_progress_bar_counts_training_steps_and_shows_no_run_id():
    """Lightning's own bar reads "Epoch 0/-2" for a run limited by steps, and shows the logger's run id."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    from demopsd.training.progress import StepProgressBar

    trainer = SimpleNamespace(max_epochs=-1, loggers=[SimpleNamespace(version="e2uc")],
                              progress_bar_metrics={"reward": 0.375, "λ": 0.93})
    lightnings = RichProgressBar()
    lightnings._trainer = trainer
    assert "/-2" in lightnings._get_train_description(0) and "v_num" in lightnings.get_metrics(trainer, None)
    ours = StepProgressBar()
    assert ours._get_train_description(0) == "training steps"
    assert ours.get_metrics(trainer, None) == {"reward": 0.375, "λ": 0.93}


def test_no_yaml_value_repeats_its_dataclass_default(tmp_path):
    """The settings dataclasses hold every default; conf/ only what differs (python -m tests.repeated_defaults)."""
    from tests.repeated_defaults import repeated_defaults

    assert repeated_defaults() == []
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "grpo.yaml").write_text(
        "defaults:\n  - /settings/method/grpo@_here_\nname: grpo\nmini_batch_size: 8\nobjective:\n  clip_low: 0.25\n"
    )
    (tmp_path / "train.yaml").write_text("seed: 0\noptim:\n  lr: 1.0e-5\n  grad_clip: 2.0\n")
    assert repeated_defaults(tmp_path) == [("method/grpo.yaml", "method.mini_batch_size", 8),
                                           ("train.yaml", "seed", 0), ("train.yaml", "optim.lr", 1e-5)]
