"""Config validation before anything loads: one line per bad value, naming the key, the value and what is accepted."""

import copy
import dataclasses
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from demopsd.config.check import ConfigError, validate_config
from demopsd.config.objectives import AGGREGATIONS, BLEND_RULES, DISCREPANCIES, DistillationConfig
from demopsd.config.methods import METHODS as METHOD_KINDS, TEACHER_KINDS
from demopsd.config.settings import SELECTIONS, WANDB_MODES
from tests.helpers import CONFIG_DIR, REPO_ROOT
from tests.test_config import DATASETS, METHODS, compose_train

LINE = re.compile(r"^[\w.]+=.+: .+$")


def problems_of(overrides: list[str]) -> list[str]:
    """The problem lines ``validate_config`` reports for the train config composed with ``overrides``."""
    with pytest.raises(ConfigError) as caught:
        validate_config(compose_train(overrides))
    error = caught.value
    assert str(error).splitlines() == error.problems
    assert all(LINE.match(line) for line in error.problems), error.problems
    return error.problems


def line_for(problems: list[str], key: str, value) -> str:
    """The one problem line about ``key`` (holding ``value``)."""
    matching = [line for line in problems if line.startswith(f"{key}={value!r}: ")]
    assert len(matching) == 1, f"no single line for {key}={value!r} in {problems}"
    return matching[0]


# ----------------------------------------------------------------------------------------- good configs
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_dataset_default_passes(method, dataset):
    validate_config(compose_train([f"method={method}", f"data={dataset}"]))


@pytest.mark.parametrize(
    "overrides",
    [
        ["debug=smoke"],
        ["experiment=sdpo_paper_qwen3_8b", "method=sdpo", "data=sciknoweval/chemistry"],
        ["logger=csv", "trainer=gpu", "method=grpo"],
        ["method=opsd", "rollout.n=1"],  # the reference answer needs no siblings
        ["method.objective.top_k=null", "method.objective.is_clip=null", "trainer.max_steps=-1"],
        ["method.teacher=live", "method.ema_rate=0"],  # the rate of an EMA teacher that does not exist
        ["method.objective.alpha=0", "method.objective.lambda_max=1", "method.objective.is_clip=1", "rollout.top_p=1"],
        ["optim.name=sgd", "optim.momentum=0.9"],
    ],
)
def test_good_settings_pass(overrides):
    validate_config(compose_train(overrides))


# ----------------------------------------------------------------------------------------- one bad value each
BAD = [
    # overrides, key, value, what the line must say is accepted (a string, or (module, name) of the accepted tuple)
    (["method.kind=foo"], "method.kind", "foo", tuple(METHOD_KINDS)),
    (["method.objective.top_k=0"], "method.objective.top_k", 0, "a positive integer, or null"),
    (["method.objective.alpha=1.5"], "method.objective.alpha", 1.5, "a value in [0, 1]"),
    (["method.objective.alpha=-0.5"], "method.objective.alpha", -0.5, "a value in [0, 1]"),
    (["method.objective.alpha=high"], "method.objective.alpha", "high", "a number"),
    (["method.objective.lambda_max=1.2"], "method.objective.lambda_max", 1.2, "a value in [0, 1]"),
    (["method.objective.is_clip=0.5"], "method.objective.is_clip", 0.5, "null (off) or a value >= 1"),
    (["method.objective.discrepancy=kl"], "method.objective.discrepancy", "kl", str(DISCREPANCIES)),
    (["method.objective.blend=step"], "method.objective.blend", "step", str(BLEND_RULES)),
    (["method.objective.aggregation=sum"], "method.objective.aggregation", "sum", str(AGGREGATIONS)),
    (["method=grpo", "method.objective.aggregation=sum"], "method.objective.aggregation", "sum", str(AGGREGATIONS)),
    (["method.reprompt.selection=best"], "method.reprompt.selection", "best", str(SELECTIONS)),
    (["method.teacher=student"], "method.teacher", "student", TEACHER_KINDS),
    (["method.ema_rate=0"], "method.ema_rate", 0, "a value in (0, 1]"),
    (["method.ema_rate=1.5"], "method.ema_rate", 1.5, "a value in (0, 1]"),
    (["rollout.n=1"], "rollout.n", 1, "an integer >= 2"),  # demopsd: demonstrations are siblings
    (["method=sdpo", "rollout.n=1"], "rollout.n", 1, "an integer >= 2"),
    (["method=grpo", "rollout.n=1"], "rollout.n", 1, "an integer >= 2 for GRPO"),
    (["method=opsd", "rollout.n=0"], "rollout.n", 0, "at least 1"),
    (["rollout.temperature=0"], "rollout.temperature", 0, "a positive temperature"),
    (["rollout.top_p=1.5"], "rollout.top_p", 1.5, "a value in (0, 1]"),
    (["rollout.top_p=0"], "rollout.top_p", 0, "a value in (0, 1]"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens", 0, "at least 1"),
    (["optim.lr=0"], "optim.lr", 0, "a positive learning rate"),
    (["optim.lr=-1e-5"], "optim.lr", -1e-5, "a positive learning rate"),
    (["optim.name=adam"], "optim.name", "adam", "adamw or sgd"),
    (["optim.name=sgd", "optim.momentum=1"], "optim.momentum", 1, "a value in [0, 1) with sgd"),
    (["optim.momentum=0.9"], "optim.momentum", 0.9, "0 with adamw"),
    (["data.batch_size=0"], "data.batch_size", 0, "an integer >= 1"),
    (["trainer.max_steps=0"], "trainer.max_steps", 0, "an integer >= 1, or -1"),
    (["trainer.max_steps=-2"], "trainer.max_steps", -2, "an integer >= 1, or -1"),
    (["logger.wandb.mode=on"], "logger.wandb.mode", "on", WANDB_MODES),
    (["eval.k=0"], "eval.k", 0, "at least 1"),
    (["eval.temperature=0"], "eval.temperature", 0, "a positive temperature"),
    (["eval.max_examples=0"], "eval.max_examples", 0, "null or at least 1"),
    (["eval.every_n_steps=-1"], "eval.every_n_steps", -1, "0 (never) or a positive number"),
    (["eval.at_end=maybe"], "eval.at_end", "maybe", "true or false"),
]


@pytest.mark.parametrize(("overrides", "key", "value", "accepted"), BAD, ids=[" ".join(case[0]) for case in BAD])
def test_a_bad_value_is_one_line_with_key_value_and_accepted(overrides, key, value, accepted):
    problems = problems_of(overrides)
    assert len(problems) == 1, problems
    assert str(accepted) in line_for(problems, key, value)


# ----------------------------------------------------------------------------------------- unknown keys
TYPOS = [
    # override, the reported key, the suggestion
    ("+method.objective.topk=5", "method.objective.topk", "method.objective.top_k"),
    ("+method.teachr=ema", "method.teachr", "method.teacher"),
    ("+method.reprompt.succes_threshold=0.9", "method.reprompt.succes_threshold", "method.reprompt.success_threshold"),
    ("+rollout.temprature=0.7", "rollout.temprature", "rollout.temperature"),
    ("+optim.weightdecay=0.1", "optim.weightdecay", "optim.weight_decay"),
    ("+data.batchsize=8", "data.batchsize", "data.batch_size"),
    ("+checkpoint.every_n_steps=10", "checkpoint.every_n_steps", "checkpoint.every_n_train_steps"),
    ("+eval.every_n_step=10", "eval.every_n_step", "eval.every_n_steps"),
]


@pytest.mark.parametrize(("override", "key", "suggestion"), TYPOS, ids=[case[0] for case in TYPOS])
def test_a_typo_is_reported_with_the_closest_key(override, key, suggestion):
    problems = problems_of([override])
    assert len(problems) == 1, problems
    value = override.split("=", 1)[1]
    value = float(value) if "." in value else int(value) if value.isdigit() else value
    assert f"did you mean {suggestion}?" in line_for(problems, key, value)


def test_topk_suggests_top_k_and_lists_the_dataclass_fields():
    line = line_for(problems_of(["+method.objective.topk=5"]), "method.objective.topk", 5)
    assert "top_k" in line
    for field in dataclasses.fields(DistillationConfig):
        assert field.name in line


def test_objective_keys_follow_the_method_kind():
    """A distillation key under GRPO is unknown there (GRPOConfig would refuse it)."""
    line = line_for(problems_of(["method=grpo", "+method.objective.top_k=5"]), "method.objective.top_k", 5)
    assert "clip_low" in line and "clip_ratio_c" in line


def test_reprompt_seed_is_the_top_level_seed():
    line = line_for(problems_of(["+method.reprompt.seed=3"]), "method.reprompt.seed", 3)
    assert "not a key of method.reprompt" in line


def test_grpo_has_no_reprompt_section():
    problems = problems_of(["method=grpo", "+method.reprompt.use_demonstrations=true"])
    line = line_for(problems, "method.reprompt", {"use_demonstrations": True})
    assert line.endswith("accepted keys: kind, mini_batch_size, name, objective")


@pytest.mark.parametrize("key, value", [("method.reprompt.use_feedback", True), ("method.objective.eps", 1e-8),
                                        ("method.objective.kl_coef", 0.1)])
def test_removed_settings_are_refused(key, value):
    """Settings that had no effect (no feedback source; a KL to nothing) or changed the loss away from the
    reference (a floor under log-probs) are refused, not silently ignored."""
    overrides = ["method=grpo"] if "kl_coef" in key else []
    line = line_for(problems_of([*overrides, f"+{key}={value}"]), key, value)
    assert "not a key of" in line


def test_reward_rule_is_checked_before_anything_loads():
    line = line_for(problems_of(["data.reward=lenient"]), "data.reward", "lenient")
    assert "answer_tag" in line and "strict" in line


def test_rollout_backend_is_a_key_though_not_a_sampling_field():
    validate_config(compose_train(["rollout.backend=hf"]))


def test_vllm_engine_settings_are_checked_before_anything_loads():
    validate_config(compose_train(["rollout=vllm", "rollout.kv_cache_memory_bytes=2000000000"]))
    problems = problems_of(["rollout=vllm", "rollout.gpu_memory_utilization=1.5", "rollout.kv_cache_memory_bytes=2e9",
                            "rollout.tensor_parallel_size=0"])
    assert line_for(problems, "rollout.gpu_memory_utilization", 1.5).endswith(": a fraction in (0, 1]")
    assert line_for(problems, "rollout.kv_cache_memory_bytes", 2e9).endswith(": an integer or null")  # YAML reads a float
    assert line_for(problems, "rollout.tensor_parallel_size", 0).endswith(": at least 1")
    assert len(problems) == 3


@pytest.mark.parametrize("trainer", [[], ["trainer=gpu"], ["trainer=ddp"], ["trainer=fsdp"], ["trainer.num_nodes=2"]])
def test_vllm_tensor_parallelism_is_refused_with_the_reason(trainer):
    """The engine runs in the training process and is handed its weights as a generator of tensors, which a
    tensor-parallel engine's worker processes would need pickled: one device per engine, whatever the trainer."""
    validate_config(compose_train(["rollout=vllm", *trainer]))
    (problem,) = problems_of(["rollout=vllm", "rollout.tensor_parallel_size=2", *trainer])
    assert problem.startswith("rollout.tensor_parallel_size=2: 1 (the engine runs in the training process")
    assert "would have to pickle" in problem


def test_the_colocated_engines_settings_are_checked():
    validate_config(compose_train(["rollout=vllm", "rollout.dtype=bfloat16", "rollout.sleep_level=1",
                                   "rollout.enforce_eager=false"]))
    problems = problems_of(["rollout=vllm", "rollout.dtype=fp8", "rollout.sleep_level=3", "rollout.enforce_eager=2"])
    assert "one of float32, bfloat16, float16" in line_for(problems, "rollout.dtype", "fp8")
    assert "2 (weights discarded)" in line_for(problems, "rollout.sleep_level", 3)
    assert line_for(problems, "rollout.enforce_eager", 2).endswith(": true or false or null")
    assert len(problems) == 3


def test_fsdp_settings_are_checked_under_every_trainer():
    validate_config(compose_train(["trainer=fsdp", "fsdp.param_dtype=float32"]))
    (problem,) = problems_of(["fsdp.param_dtype=fp8"])
    assert problem == "fsdp.param_dtype='fp8': one of float32, bfloat16, float16"


# ----------------------------------------------------------------------------------------- all at once
def test_every_problem_is_reported_at_once():
    problems = problems_of(
        [
            "method.objective.alpha=1.5",
            "method.objective.lambda_max=2",  # a second failed rule of the same dataclass
            "method.objective.discrepancy=kl",
            "+method.objective.topk=5",
            "method.teacher=ema",
            "method.ema_rate=0",
            "rollout.top_p=0",
            "rollout.temperature=-1",
            "optim.lr=0",
            "data.batch_size=0",
            "trainer.max_steps=0",
            "logger.wandb.mode=on",
        ]
    )
    keys = [line.split("=", 1)[0] for line in problems]
    assert sorted(keys) == sorted(
        ["method.objective.alpha", "method.objective.lambda_max", "method.objective.discrepancy",
         "method.objective.topk", "method.ema_rate", "rollout.top_p", "rollout.temperature",
         "optim.lr", "data.batch_size", "trainer.max_steps", "logger.wandb.mode"]
    )


def test_every_failed_rule_of_one_dataclass_is_found():
    problems = problems_of(["rollout.temperature=0", "rollout.top_p=2", "rollout.max_new_tokens=0"])
    keys = [line.split("=", 1)[0] for line in problems]
    assert keys == ["rollout.temperature", "rollout.top_p", "rollout.max_new_tokens"]


# ----------------------------------------------------------------------------------------- before the heavy imports
def test_validation_imports_no_transformers_or_lightning():
    """So that a bad value stops a run within seconds (tests.test_config itself imports them)."""
    code = f"""
import sys
from hydra import compose, initialize_config_dir
import demopsd.config.store
from demopsd.config.check import ConfigError, validate_config

def compose_train(overrides):
    with initialize_config_dir(config_dir={str(CONFIG_DIR)!r}, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)

validate_config(compose_train(["method=sdpo"]))
try:
    validate_config(compose_train(["method=grpo", "rollout.n=1", "optim.lr=0"]))
except ConfigError as error:
    assert len(error.problems) == 2, error.problems
heavy = [m for m in ("transformers", "lightning") if m in sys.modules]
assert not heavy, heavy
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------- inside the Hydra app
@pytest.fixture
def hydra_app():
    """Compose as `python src/train.py` does (Hydra initialised, its runtime config set) and validate in there."""
    def validate(overrides: list[str]) -> None:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            task_cfg = copy.deepcopy(cfg)  # what Hydra hands the task function
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            validate_config(task_cfg)

    yield validate
    HydraConfig.instance().cfg = None


def test_inside_the_app_the_reference_uses_the_runs_own_choices(hydra_app):
    hydra_app(["experiment=sdpo_paper_qwen3_8b", "debug=smoke", "method=opsd", "data=sciknoweval/physics"])
    with pytest.raises(ConfigError) as caught:
        hydra_app(["method=grpo", "+checkpoint.every_n_step=5", "+method.teacher=ema"])
    assert sorted(line.split("=", 1)[0] for line in caught.value.problems) == ["checkpoint.every_n_step", "method.teacher"]


# ----------------------------------------------------------------------------------------- the command line
def test_train_cli_stops_on_a_bad_value_with_one_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "src/train.py", "method.objective.alpha=1.5", f"paths.log_dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "method.objective.alpha=1.5" in result.stderr.strip().splitlines()[-1]
    assert "a value in [0, 1]" in result.stderr


# ----------------------------------------------------------------------------------------- mini- and micro-batches
@pytest.mark.parametrize("batch_size, mini_batch_size, updates", [(32, 8, 4), (32, 32, 1), (4, 8, 1), (16, None, 1)])
def test_updates_per_step_are_the_batch_over_the_mini_batch(batch_size, mini_batch_size, updates):
    """The reference's GRPO: 32 prompts in mini-batches of 8 make 4 updates; a mini-batch of at least the whole
    batch (or none) makes one."""
    settings = validate_config(compose_train([
        "method=grpo", f"data.batch_size={batch_size}", f"method.mini_batch_size={mini_batch_size or 'null'}",
    ]))
    assert settings.updates_per_batch == updates


@pytest.mark.parametrize("overrides, accepted", [
    (["data.batch_size=12", "method.mini_batch_size=8"], "a divisor of data.batch_size=12"),
    (["data.batch_size=8", "method.mini_batch_size=2", "trainer=ddp", "trainer.devices=4"],
     "a multiple of the 4 training processes"),
    (["method.mini_batch_size=0"], "null (one update per step) or a positive number of prompts"),
])
def test_a_mini_batch_that_does_not_split_the_batch_is_refused(overrides, accepted):
    value = int(overrides[-1 if "trainer" not in overrides[-1] else 1].split("=")[1])
    assert accepted in line_for(problems_of(["method=grpo", *overrides]), "method.mini_batch_size", value)


def test_the_micro_batch_budget_and_the_moved_gradient_clip_are_checked():
    problems = problems_of(["memory.micro_batch_tokens=0", "+trainer.gradient_clip_val=1.0", "optim.grad_clip=-1"])
    assert "positive number of tokens" in line_for(problems, "memory.micro_batch_tokens", 0)
    assert "optim.grad_clip" in line_for(problems, "trainer.gradient_clip_val", 1.0)
    assert "positive norm" in line_for(problems, "optim.grad_clip", -1)


@pytest.mark.parametrize("key, value", [("data.on_long_prompt", "cut"), ("data.prompt_style", "gpqa")])
def test_data_choices_are_checked_before_anything_loads(key, value):
    overrides = ["data=gpqa/diamond"] if "prompt_style" in key else []
    assert "one of" in line_for(problems_of([*overrides, f"{key}={value}"]), key, value)


@pytest.mark.parametrize("overrides, problem", [
    (["data.batch_size=1"], True), (["data.batch_size=2", "trainer=ddp", "trainer.devices=2"], True),
    (["data.batch_size=4", "trainer=ddp", "trainer.devices=2"], False), (["data.batch_size=2"], False),
])
def test_the_placebo_needs_another_prompt_in_each_process(overrides, problem):
    cfg = compose_train(["method=demopsd_placebo", *overrides])
    if not problem:
        assert validate_config(cfg).method.reprompt.placebo
        return
    (line,) = problems_of(["method=demopsd_placebo", *overrides])
    assert line.startswith("data.batch_size=") and "at least 2 prompts per training process" in line
