"""Hyperparameter searches: the W&B sweep specs in sweeps/, the Optuna preset, the value main() returns,
and the W&B metric definitions the sweeps' objective relies on.

A sweep spec is checked the way W&B will use it: its parameters are keys of the composed config (or, for
``method``, options of conf/method/), one sample is expanded into ``key=value`` arguments by W&B's own
``${args_no_hyphens}`` code, and ``src/train.py``'s overrides from the spec's ``command`` compose and validate.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from omegaconf import OmegaConf

import demopsd.runtime.loggers as logging_setup
from demopsd.config.check import validate_config
from tests.helpers import CONFIG_DIR, REPO_ROOT
from tests.test_config import compose_train

SWEEP_DIR = REPO_ROOT / "sweeps"
SPECS = sorted(SWEEP_DIR.glob("*.yaml"))
SPEC_IDS = [p.stem for p in SPECS]
ABSENT = object()

# The official sweep schema (docs.wandb.ai, "Sweep configuration options"): top-level keys, search methods,
# goals, and the distributions with the keys each takes.
TOP_LEVEL_KEYS = {"program", "command", "method", "metric", "parameters", "name", "description", "project",
                  "entity", "early_terminate", "run_cap"}
SEARCH_METHODS = {"grid", "random", "bayes"}
RANGE_DISTRIBUTIONS = {"int_uniform", "uniform", "q_uniform", "log_uniform", "log_uniform_values", "q_log_uniform",
                       "q_log_uniform_values", "inv_log_uniform", "inv_log_uniform_values"}
EXPONENT_DISTRIBUTIONS = {"log_uniform", "q_log_uniform"}  # min and max are natural logs of the bounds
MACROS = {"${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}",
          "${args_json_file}", "${args_no_boolean_flags}", "${args_append_hydra}", "${args_override_hydra}"}


def project_venv() -> str:
    """The environment `make setup` creates (the Makefile's ``VENV``), whose Python the sweeps' runs use."""
    (venv,) = re.findall(r"^VENV \?= (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    return venv


def load_spec(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def fixed_overrides(spec: dict) -> list[str]:
    """The Hydra overrides ``command`` passes to every run: the items after ``src/train.py`` that are not macros."""
    command = spec["command"]
    return [item for item in command[command.index("src/train.py") + 1:] if item not in MACROS]


def is_group(key: str) -> bool:
    """A config group choice (``method=sdpo``) rather than a config key."""
    return (CONFIG_DIR / key).is_dir()


def first_value(parameter: dict):
    """One sample W&B could draw: the value, the first of ``values``, or the lower end of a range distribution."""
    if "value" in parameter:
        return parameter["value"]
    if "values" in parameter:
        return parameter["values"][0]
    return bounds(parameter)[0]


def bounds(parameter: dict) -> tuple:
    distribution = parameter.get("distribution", "uniform")
    if distribution not in RANGE_DISTRIBUTIONS:
        raise NotImplementedError(f"no sample rule for distribution {distribution!r} in this test")
    low, high = parameter["min"], parameter["max"]
    if distribution in EXPONENT_DISTRIBUTIONS:
        return math.exp(low), math.exp(high)
    return (int(low), int(high)) if distribution == "int_uniform" else (float(low), float(high))


def args_no_hyphens(sample: dict) -> list[str]:
    """``${args_no_hyphens}`` exactly as the W&B agent builds it (``key=value`` with Python's ``str``)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    args = create_sweep_command_args({"args": {key: {"value": value} for key, value in sample.items()}})
    return args["args_no_hyphens"]


def run_overrides(spec: dict, sample: dict) -> list[str]:
    """The override list the agent passes to src/train.py: the sample's ``key=value``, then the fixed ones."""
    return args_no_hyphens(sample) + fixed_overrides(spec)


def hydra_value(value):
    """What Hydra makes of ``key=<str(value)>``: the string ``"null"`` is None, everything else is itself."""
    return None if value == "null" else value


def assert_lands(cfg, sample: dict) -> None:
    for key, value in sample.items():
        if is_group(key):
            assert OmegaConf.select(cfg, f"{key}.name") == value, key
        else:
            assert OmegaConf.select(cfg, key) == hydra_value(value), key


# --------------------------------------------------------------------------- W&B sweep specs


def test_the_sweeps_are_there():
    assert {"demopsd_blending", "demopsd_blending_gpu", "demopsd_support", "methods_seeds"} <= set(SPEC_IDS)


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_spec_names_the_project_the_runs_log_to(path):
    assert load_spec(path)["project"] == compose_train([]).logger.wandb.project


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_spec_follows_the_wandb_schema(path):
    spec = load_spec(path)
    assert set(spec) <= TOP_LEVEL_KEYS, f"unknown top-level keys: {set(spec) - TOP_LEVEL_KEYS}"
    assert spec["method"] in SEARCH_METHODS
    assert (REPO_ROOT / spec["program"]).is_file()
    if spec["method"] == "bayes" or "metric" in spec:
        assert set(spec["metric"]) == {"name", "goal"} and spec["metric"]["goal"] in ("maximize", "minimize")
    assert spec["parameters"]
    for key, parameter in spec["parameters"].items():
        assert isinstance(parameter, dict), key
        kinds = {"value", "values", "distribution", "min"} & set(parameter)
        if "values" in parameter:
            assert isinstance(parameter["values"], list) and parameter["values"], key
            assert parameter.get("distribution", "categorical") == "categorical", key
        elif "value" not in parameter:
            assert {"min", "max"} <= set(parameter), key
            low, high = bounds(parameter)
            assert low < high, key
        assert kinds, key
        if spec["method"] == "grid":
            assert "value" in parameter or "values" in parameter, f"grid search needs discrete values: {key}"
        for value in parameter.get("values", []):
            assert value is not None, f"{key}: W&B writes None as 'None'; use the string \"null\" for Hydra's null"

    command = spec["command"]
    assert command[:3] == ["${env}", f"{project_venv()}/bin/python", "src/train.py"]  # not ${interpreter}: `python`
    assert command.count("${args_no_hyphens}") == 1
    assert not {"${args}", "${program}"} & set(command[3:]), "Hydra takes key=value, not --key=value"
    for item in fixed_overrides(spec):
        assert ("=" in item or item.startswith("~")) and not item.startswith("-"), item  # ~group deletes a default


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_parameters_are_config_keys_or_group_options(path):
    spec = load_spec(path)
    cfg = compose_train(fixed_overrides(spec))
    for key, parameter in spec["parameters"].items():
        if is_group(key):
            options = {p.stem for p in (CONFIG_DIR / key).glob("*.yaml")}
            listed = parameter.get("values", [parameter.get("value")])
            assert set(listed) <= options, f"{key}: {set(listed) - options} not in conf/{key}/"
        else:
            assert OmegaConf.select(cfg, key, default=ABSENT) is not ABSENT, f"{key} is not a key of the config"


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_metric_is_what_the_run_logs(path):
    """The objective is the in-domain eval column of the data the command trains on."""
    spec = load_spec(path)
    cfg = compose_train(fixed_overrides(spec))
    assert spec["metric"]["name"] == f"eval/{cfg.data.name}/acc_avg@{cfg.eval.k}" == "eval/sciknoweval-biology/acc_avg@4"
    assert cfg.eval.at_end or cfg.eval.every_n_steps


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_one_sample_composes_and_validates(path):
    spec = load_spec(path)
    sample = {key: first_value(parameter) for key, parameter in spec["parameters"].items()}
    overrides = run_overrides(spec, sample)
    assert overrides[: len(sample)] == [f"{key}={value}" for key, value in sample.items()]
    cfg = compose_train(overrides)
    assert_lands(cfg, sample)
    assert cfg.data.name == "sciknoweval-biology"
    validate_config(cfg)


@pytest.mark.parametrize("path", SPECS, ids=SPEC_IDS)
def test_every_listed_value_and_range_end_validates(path):
    """Each categorical value and both ends of each range, one at a time on top of the first sample."""
    spec = load_spec(path)
    base = {key: first_value(parameter) for key, parameter in spec["parameters"].items()}
    for key, parameter in spec["parameters"].items():
        candidates = parameter.get("values") or ([parameter["value"]] if "value" in parameter else bounds(parameter))
        for value in candidates:
            sample = {**base, key: value}
            cfg = compose_train(run_overrides(spec, sample))
            assert_lands(cfg, sample)
            validate_config(cfg)


def test_support_grid_nulls_reach_hydra_as_null():
    spec = load_spec(SWEEP_DIR / "demopsd_support.yaml")
    sample = {"method.objective.top_k": "null", "method.objective.is_clip": "null"}
    assert args_no_hyphens(sample) == ["method.objective.top_k=null", "method.objective.is_clip=null"]
    cfg = compose_train(run_overrides(spec, sample))
    assert cfg.method.objective.top_k is None and cfg.method.objective.is_clip is None
    validate_config(cfg)


# --------------------------------------------------------------------------- Optuna preset


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_optuna_preset_composes_as_a_multirun():
    cfg = compose_with_hydra(["hparams_search=demopsd_optuna", "data=sciknoweval/biology"])
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower()
    assert "optuna" in sweeper.sampler._target_.lower()
    assert str(cfg.hydra.mode).endswith("MULTIRUN")
    assert str(sweeper.direction).lower().endswith("maximize") and sweeper.n_trials >= 1
    assert cfg.method.name == "demopsd"
    assert cfg.optimized_metric == f"eval/{cfg.data.name}/acc_avg@{cfg.eval.k}" == "eval/sciknoweval-biology/acc_avg@4"
    assert cfg.eval.at_end, "the optimised metric comes from the final evaluation"
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "optuna"


def test_optuna_params_are_config_keys_and_their_values_validate():
    cfg = compose_with_hydra(["hparams_search=demopsd_optuna"])
    params = cfg.hydra.sweeper.params
    assert set(params) == {"method.objective.lambda_max", "method.objective.temperature",
                           "method.objective.blend", "method.objective.discrepancy"}
    parser = OverridesParser.create()
    for key, expression in params.items():
        assert OmegaConf.select(cfg, key, default=ABSENT) is not ABSENT, f"{key} is not a key of the config"
        sweep = parser.parse_override(f"{key}={expression}").value()
        if isinstance(sweep, ChoiceSweep):
            values = list(sweep.list)
        else:
            assert isinstance(sweep, IntervalSweep), (key, expression)
            values = [sweep.start, sweep.end]
        for value in values:
            trial = compose_train(["hparams_search=demopsd_optuna", f"{key}={value}"])
            assert OmegaConf.select(trial, key) == value
            validate_config(trial)


def test_optuna_sweeper_plugin_is_installed():
    from hydra.utils import get_class

    cfg = compose_with_hydra(["hparams_search=demopsd_optuna"])
    assert get_class(cfg.hydra.sweeper._target_).__name__ == "OptunaSweeper"


STUB_APP = '''
import importlib.util, sys
from pathlib import Path
import hydra

spec = importlib.util.spec_from_file_location("train_script", {train!r})
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


@hydra.main(version_base="1.3", config_path={conf!r}, config_name="train")
def main(cfg):
    """src/train.py's main with a stand-in for training: logs the metric, then returns what main returns."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accuracy = 1.0 - abs(cfg.method.objective.lambda_max - 0.5)
    (out / "metrics.csv").write_text(f"step,{{cfg.optimized_metric}}\\n2,{{accuracy}}\\n", encoding="utf-8")
    return train.optimized_value(cfg.optimized_metric, {{cfg.optimized_metric: accuracy}})


main()
'''


def test_optuna_search_runs_and_maximises_what_main_returns(tmp_path):
    """The preset under the real Optuna sweeper, training replaced by a stub that logs the eval metric."""
    import subprocess
    import sys

    app = tmp_path / "app.py"
    app.write_text(STUB_APP.format(train=str(REPO_ROOT / "src" / "train.py"), conf=str(CONFIG_DIR)), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(app), "hparams_search=demopsd_optuna", "hydra.sweeper.n_trials=3",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.job.chdir=false"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text(encoding="utf-8"))
    assert set(best["best_params"]) == {"method.objective.lambda_max", "method.objective.temperature",
                                        "method.objective.blend", "method.objective.discrepancy"}
    assert best["best_value"] == pytest.approx(1.0 - abs(best["best_params"]["method.objective.lambda_max"] - 0.5))
    trials = sorted((tmp_path / "sweep").glob("*/metrics.csv"))
    assert len(trials) == 3
    values = [float(p.read_text(encoding="utf-8").splitlines()[1].split(",")[1]) for p in trials]
    assert best["best_value"] == pytest.approx(max(values))


def test_optuna_search_keeps_its_study_in_sqlite_as_documented(tmp_path):
    """The preset's documented `hydra.sweeper.storage=sqlite:///...`: two trials land in the database, and a
    second invocation of the same command resumes the study (two more trials, four in all)."""
    import subprocess
    import sys

    import optuna

    app = tmp_path / "app.py"
    app.write_text(STUB_APP.format(train=str(REPO_ROOT / "src" / "train.py"), conf=str(CONFIG_DIR)), encoding="utf-8")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for invocation in range(2):
        result = subprocess.run(
            [sys.executable, str(app), "hparams_search=demopsd_optuna", "hydra.sweeper.n_trials=2",
             f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=blend",
             f"hydra.sweep.dir={tmp_path / f'sweep{invocation}'}", "hydra.job.chdir=false"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="blend", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    assert study.best_value == pytest.approx(max(t.value for t in complete))


def test_no_search_by_default():
    cfg = compose_with_hydra([])
    assert cfg.optimized_metric is None
    assert cfg.hydra.runtime.choices["hparams_search"] is None
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "basic"


# --------------------------------------------------------------------------- what main() returns


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("demopsd_train_script", REPO_ROOT / "src" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_returns_nothing_without_an_optimized_metric(train_script, tmp_path):
    assert train_script.optimized_value(None, {"train/entropy": 1.0}) is None


def test_main_returns_the_named_metric(train_script, tmp_path):
    assert train_script.optimized_value("train/entropy", {"train/entropy": 1.25}) == 1.25


def test_missing_metric_names_the_key_and_what_was_logged(train_script, tmp_path):
    logged = {"train/entropy": 1.0, "eval/gpqa-diamond/acc_avg@4": 0.3}
    with pytest.raises(LookupError) as error:
        train_script.optimized_value("eval/typo/acc_avg@4", logged)
    message = str(error.value)
    assert "optimized_metric='eval/typo/acc_avg@4'" in message
    assert "train/entropy" in message and "eval/gpqa-diamond/acc_avg@4" in message


# --------------------------------------------------------------------------- W&B metric definitions

EXPECTED_DEFINITIONS = [
    ("trainer/global_step", {}),
    ("train/*", {"step_metric": "trainer/global_step", "summary": None}),
    ("distill/*", {"step_metric": "trainer/global_step", "summary": None}),
    ("leakage/*", {"step_metric": "trainer/global_step", "summary": "mean"}),
    ("perf/*", {"step_metric": "trainer/global_step", "summary": None}),
    ("eval/*", {"step_metric": "trainer/global_step", "summary": "last"}),
    ("train/entropy", {"step_metric": "trainer/global_step", "summary": "last"}),
]


class RecordingRun:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def define_metric(self, name, **kwargs):
        if self.fail:
            raise RuntimeError("W&B refused")
        self.calls.append((name, kwargs))


def test_define_metrics_calls():
    run = RecordingRun()
    logging_setup.define_metrics(run)
    assert run.calls == EXPECTED_DEFINITIONS


def test_define_metrics_never_raises(caplog):
    with caplog.at_level(logging.WARNING, logger="demopsd.runtime.loggers"):
        logging_setup.define_metrics(RecordingRun(fail=True))
    assert "W&B refused" in caplog.text


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, with every file it writes under ``tmp_path``."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_wandb_logger_defines_the_metrics_on_an_offline_run(offline_wandb, monkeypatch, caplog):
    started, calls = [], []
    real_define_metrics = logging_setup.define_metrics

    def spy(run):
        started.append(run)
        original = run.define_metric

        def recording(name, **kwargs):
            calls.append((name, kwargs))
            return original(name, **kwargs)

        monkeypatch.setattr(run, "define_metric", recording)
        real_define_metrics(run)

    monkeypatch.setattr(logging_setup, "define_metrics", spy)
    wandb_cfg = OmegaConf.create({"mode": "offline", "project": "demopsd-test", "entity": None,
                                  "group": "sdpo_sciknoweval-biology", "job_type": "train", "tags": ["sdpo", "x"]})
    with caplog.at_level(logging.INFO, logger="demopsd.runtime.loggers"):
        logger = logging_setup.make_wandb_logger(wandb_cfg, save_dir=offline_wandb / "run", run_name="t", config={})
    assert logger is not None
    run = logger.experiment
    sync_dir = Path(run.dir).parent
    assert f"uploaded after it ends with `wandb sync {sync_dir}`" in caplog.text
    try:
        assert (run.group, run.job_type, tuple(run.tags)) == ("sdpo_sciknoweval-biology", "train", ("sdpo", "x"))
        assert started == [run]
        assert calls == EXPECTED_DEFINITIONS
        assert "metric definitions failed" not in caplog.text  # the real W&B accepted every definition

        # Logging through the definitions works; the summaries themselves (eval max 0.5, entropy last, leakage
        # mean) are computed by W&B's service and reach the in-process `run.summary` racily, so not checked here.
        for step, (accuracy, entropy, leakage) in enumerate([(0.5, 1.0, 2.0), (0.25, 0.75, 4.0)]):
            logger.log_metrics({"eval/sciknoweval-biology/acc_avg@4": accuracy, "train/entropy": entropy,
                                "leakage/kl_teacher_student": leakage}, step=step)
    finally:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="demopsd.runtime.loggers"):
            logging_setup.finish_wandb([logger])
    assert f"Upload this run to W&B with: wandb sync {sync_dir}" in caplog.text
    assert sync_dir.is_dir() and sync_dir.name.startswith("offline-run-")


def test_an_offline_run_starts_without_wandbs_warning_about_the_retired_anonymous_setting(offline_wandb, monkeypatch,
                                                                                         capfd):
    monkeypatch.delenv("WANDB_SILENT")  # W&B prints its own warnings to the terminal
    wandb_cfg = OmegaConf.create({"mode": "offline", "project": "demopsd-test", "entity": None, "group": None,
                                  "job_type": "train", "tags": []})
    logger = logging_setup.make_wandb_logger(wandb_cfg, save_dir=offline_wandb / "run", run_name="t", config={})
    try:
        assert logger is not None and logger.experiment.offline
    finally:
        logging_setup.finish_wandb([logger])
    printed = capfd.readouterr()
    assert "anonymous" not in printed.out + printed.err


def test_run_group_job_type_and_tags_default_to_method_and_dataset():
    wandb = compose_train(["method=sdpo", "data=sciknoweval/chemistry"]).logger.wandb
    assert (wandb.group, wandb.job_type, list(wandb.tags)) == (
        "sdpo_sciknoweval-chemistry", "train", ["sdpo", "sciknoweval-chemistry"])

