"""The W&B dashboard, built without a server: every panel shows a metric the trainer or the evaluator logs.

The logged names are collected from the code itself: one real training step of each method (``fixed_step``)
and the evaluator's summaries of a held-out evaluation (with the changes from the untrained model), on the
dataset names of ``conf/data``. A renamed metric then fails here instead of leaving an empty panel.
"""

import math
import re

import pytest
import yaml
from omegaconf import OmegaConf

from demopsd.evaluation.evaluate import summarize
from demopsd.evaluation.metrics import changes_from
from demopsd.report.dashboard import (
    GROUP_BY, MAX_RUNS, SECTIONS, NotLoggedInError, build_workspace, save_workspace,
)
from demopsd.runtime.loggers import STEP_METRIC
from tests.fixed_step import example, setup_step
from tests.helpers import CONFIG_DIR, REPO_ROOT, run_python
from tests.test_config import compose_train

RESPONSES = ["<reasoning>\nTwo.\n</reasoning>\n<answer>\nB\n</answer>", "I would say A", "Maybe C", "D"]


@pytest.fixture(scope="module")
def logged_names() -> set[str]:
    names: set[str] = set()
    with pytest.MonkeyPatch.context() as monkeypatch:
        for method in ("demopsd", "sdpo", "opsd", "grpo"):
            step = setup_step(monkeypatch, method, RESPONSES, [1.0, 0.0, 0.0, 0.0], "rollout.n=4")
            trainer = step.fit([example("Which option is the number two?", "B")])
            names |= set(trainer.logged_metrics) | set(trainer.callback_metrics)
    record = {"idx": 0, "answer": "B", "letter_probs": {"A": 0.1, "B": 0.6, "C": 0.2, "D": 0.1},
              "samples": [{"predicted": "B", "correct": True, "well_formed": True, "length": 9}],
              "greedy": {"correct": True}}
    for dataset in dataset_names():  # two questions: one has no standard error over questions
        metrics = summarize(dataset, [record, {**record, "idx": 1}], k=1, entropy=1.0)
        names |= set(metrics) | set(changes_from(metrics, metrics))
    return names


def dataset_names() -> list[str]:
    return [OmegaConf.load(path)["name"] for path in sorted((CONFIG_DIR / "data").glob("*/[!_]*.yaml"))]


def panels():
    return [(section, panel) for section, section_panels in SECTIONS.items() for panel in section_panels]


@pytest.mark.parametrize("section, panel", panels(), ids=[p.title for _, p in panels()])
def test_every_panel_shows_logged_metrics(section, panel, logged_names):
    missing = set(panel.metrics) - logged_names
    assert not missing, f"{section} / {panel.title}: {sorted(missing)} are not logged"
    if panel.regex is not None:
        assert any(re.search(panel.regex, name) for name in logged_names), f"{panel.regex} matches nothing logged"
    assert panel.metrics or panel.regex


def test_the_collected_names_hold_what_the_sections_are_about(logged_names):
    """The collection itself reaches the trainer and the evaluator (else the test above proves nothing)."""
    for name in ("leakage/attenuation", "distill/lambda_q90", "grpo/loss", "perf/step_seconds",
                 "eval/synthetic-uninferable/overconfidence_change", "eval/gpqa-diamond/acc_avg@1",
                 "eval/gpqa-diamond/acc_avg_se@1"):
        assert name in logged_names


def test_workspace_groups_by_the_run_group_with_a_band_over_seeds():
    workspace = build_workspace("someone", "demopsd")
    assert [s.name for s in workspace.sections] == ["Leakage", "Entropy", "Blending", "Reward and accuracy",
                                                    "Throughput"]
    (group,) = workspace.runset_settings.groupby
    assert (group.section, group.name) == ("run", GROUP_BY)  # the W&B run's group, not a config key
    wandb = compose_train(["method=sdpo", "data=sciknoweval/chemistry"]).logger.wandb
    assert wandb.group == "sdpo_sciknoweval-chemistry"  # what each run passes as its group: method and dataset
    plots = [p for s in workspace.sections for p in s.panels]
    assert len(plots) == len(panels())
    for plot in plots:
        assert (plot.groupby_aggfunc, plot.groupby_rangefunc) == ("mean", "stderr")
        assert plot.x == STEP_METRIC
    assert workspace._to_model()  # serialises to what the W&B API receives


def sweep_size(spec: dict) -> int:
    """Runs a W&B sweep spec starts: its grid, or its run cap."""
    if spec["method"] == "grid":
        return math.prod(len(p.get("values", [p.get("value")])) for p in spec["parameters"].values())
    return spec["run_cap"]


def test_each_panel_shows_every_run_of_the_largest_sweep():
    sizes = {path.stem: sweep_size(yaml.safe_load(path.read_text())) for path in (REPO_ROOT / "sweeps").glob("*.yaml")}
    assert sizes["methods_seeds"] == 12 and sizes["demopsd_support"] == 20  # the grids their comments state
    assert build_workspace("someone", "demopsd").settings.max_runs == MAX_RUNS >= max(sizes.values()) > 10


def test_without_a_login_the_command_says_so_and_exits_2(tmp_path, monkeypatch):
    result = run_python("src/dashboard.py", "--entity", "someone", env={
        "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc"), "HOME": str(tmp_path),
        "WANDB_BASE_URL": "https://wandb.example.com"})
    assert result.returncode == 2
    assert "no login for https://wandb.example.com" in result.stderr
    assert "wandb login --host https://wandb.example.com" in result.stderr
    assert "Traceback" not in result.stderr
    monkeypatch.setattr("demopsd.report.dashboard.wandb_login", lambda: ("https://w.example", "no login"))
    with pytest.raises(NotLoggedInError, match="https://w.example"):
        save_workspace("someone", "demopsd")
