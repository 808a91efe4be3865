"""The project's W&B workspace as code: leakage, entropy, blending, reward and throughput, runs grouped by their run
group (method and dataset), seeds drawn as a mean with a standard-error band.

:func:`build_workspace` only builds the object (no server involved; ``tests/test_dashboard.py`` checks each panel
against the metrics the trainer and the evaluator log); :func:`save_workspace` writes it to W&B.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from demopsd.runtime.loggers import STEP_METRIC, wandb_login

WORKSPACE_NAME = "demopsd: leakage and exploration"
PROBE = ("letter_confidence", "overconfidence", "letter_entropy", "letter_accuracy")


@dataclass(frozen=True)
class Panel:
    """One line plot: exact metric names, or a regular expression over metric names."""

    title: str
    metrics: tuple[str, ...] = ()
    regex: str | None = None


SECTIONS: dict[str, tuple[Panel, ...]] = {
    "Leakage": (
        Panel("KL(teacher ‖ student) and KL(target ‖ student) per token, on the objective's support",
              ("leakage/kl_teacher_student", "leakage/kl_target_student")),
        Panel("attenuation: KL(target ‖ student) / KL(teacher ‖ student) (1 for SDPO and OPSD)",
              ("leakage/attenuation",)),
        Panel("KL(teacher ‖ student), full vocabulary", ("leakage/kl_teacher_student_full",)),
        Panel("probability of the correct letter at the answer, teacher and student",
              ("leakage/teacher_p_answer", "leakage/student_p_answer")),
        *(Panel(f"held-out {name.replace('_', ' ')}, change from the starting model", regex=rf"^eval/[^/]+/{name}_change$")
          for name in PROBE),
    ),
    "Entropy": (
        Panel("training token entropy (student, own rollouts)", ("train/entropy",)),
        Panel("held-out response entropy", regex=r"^eval/[^/]+/entropy$"),
        Panel("held-out response entropy, change from the starting model", regex=r"^eval/[^/]+/entropy_change$"),
        Panel("held-out answers: share of the most frequent letter (1: collapse onto one letter)",
              regex=r"^eval/[^/]+/answer_top_share$"),
        Panel("held-out answers: entropy of their letters across questions (nats)",
              regex=r"^eval/[^/]+/answer_letter_entropy$"),
        Panel("held-out distinct answers among a question's k (exploration)",
              regex=r"^eval/[^/]+/distinct_answers@\d+$"),
        Panel("held-out answer probe: share of questions whose preferred letter is the most common one",
              regex=r"^eval/[^/]+/probe_top_share$"),
    ),
    "Blending": (
        Panel("λ: mean and quantiles over distilled tokens",
              ("distill/lambda_mean", "distill/lambda_q10", "distill/lambda_q50", "distill/lambda_q90")),
        Panel("discrepancy D between teacher and student", ("distill/discrepancy_mean",)),
        Panel("rollouts with a privileged context: any, a successful sibling",
              ("distill/mask_fraction", "distill/demonstration_fraction")),
        Panel("importance weights", ("distill/is_weight_mean", "distill/is_clip_fraction")),
        Panel("distillation loss", ("distill/loss",)),
    ),
    "Reward and accuracy": (
        Panel("training reward and accuracy", ("train/reward_mean", "train/accuracy")),
        Panel("well-formed answers", ("train/format_rate",)),
        Panel("response length (tokens)", ("train/response_length",)),
        Panel("held-out accuracy, avg@k", regex=r"^eval/[^/]+/acc_avg@\d+$"),
        Panel("held-out accuracy, standard error over questions", regex=r"^eval/[^/]+/acc_avg_se@\d+$"),
        Panel("held-out pass@k", regex=r"^eval/[^/]+/pass@\d+$"),
        Panel("GPQA accuracy, avg@k (out of distribution)", regex=r"^eval/gpqa[^/]*/acc_avg@\d+$"),
        Panel("GRPO: loss, advantage, groups with varied rewards, clipping, sampler weight",
              ("grpo/loss", "grpo/advantage_abs_mean", "grpo/varied_group_fraction", "grpo/clip_fraction",
               "grpo/sampler_weight_mean")),
    ),
    "Throughput": (
        Panel("seconds per phase of the step", regex=r"^perf/.*_seconds$"),
        Panel("rollout tokens per second", ("perf/rollout_tokens_per_s",)),
    ),
}
GROUP_BY = "group"
"""The W&B run attribute the workspace groups runs by: the run group, ``logger.wandb.group`` (``<method>_<dataset>``),
one line (mean over seeds, s.e. band) per method and dataset. A run's config cannot serve: a W&B sweep over
``method`` (sweeps/methods_seeds.yaml) replaces the config's ``method`` section with the option's name."""
MAX_RUNS = 100
"""Runs (or groups) each panel draws: every run of the largest sweep in sweeps/ (W&B's default is 10)."""


def build_workspace(entity: str, project: str, name: str = WORKSPACE_NAME):
    """The ``wandb_workspaces`` Workspace of :data:`SECTIONS`, its runs grouped by :data:`GROUP_BY`, up to
    :data:`MAX_RUNS` of them in each panel."""
    with warnings.catch_warnings():  # the package's pydantic-v1-style validators, nothing a user can act on
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces.expr import Metric

    def plot(panel: Panel):
        return wr.LinePlot(
            title=panel.title, x=STEP_METRIC, y=list(panel.metrics), metric_regex=panel.regex,
            groupby_aggfunc="mean", groupby_rangefunc="stderr",
        )

    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[ws.Section(name=title, panels=[plot(p) for p in panels], is_open=True)
                  for title, panels in SECTIONS.items()],
        settings=ws.WorkspaceSettings(x_axis=STEP_METRIC, max_runs=MAX_RUNS),
        runset_settings=ws.RunsetSettings(groupby=[Metric(GROUP_BY)]),
    )


class NotLoggedInError(RuntimeError):
    """W&B has no credentials on this machine."""


def save_workspace(entity: str, project: str, name: str = WORKSPACE_NAME, url: str | None = None) -> str:
    """Save the workspace to ``entity/project``: a new saved view, or, given the ``url`` of one saved before, that
    view updated in place. Returns its URL.

    Raises :class:`NotLoggedInError` where ``wandb`` has no login for its server (:func:`wandb_login`).
    """
    server, problem = wandb_login()
    if problem:
        raise NotLoggedInError(
            f"the dashboard is saved to the W&B server {server}, and {problem}: log in, then run this command "
            "again. Offline runs are uploaded with `wandb sync`."
        )
    workspace = build_workspace(entity, project, name)
    if url is not None:
        import wandb_workspaces.workspaces as ws

        saved = ws.Workspace.from_url(url)
        for field in ("name", "sections", "settings", "runset_settings"):
            setattr(saved, field, getattr(workspace, field))
        workspace = saved
    workspace.save()
    return workspace.url
