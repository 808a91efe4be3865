"""Weights & Biases that never blocks or crashes a run: online where ``wandb`` has a login, offline (saying why)
where not, CSV-only on failure."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from demopsd.config.settings import WANDB_MODES

log = logging.getLogger(__name__)

# W&B charts: every metric family over the training step; summaries the sweeps (sweeps/) and tables read.
STEP_METRIC = "trainer/global_step"  # what Lightning's WandbLogger logs beside every metric
STEPPED_METRICS = ("train/*", "distill/*", "leakage/*", "perf/*", "eval/*")
METRIC_SUMMARIES = {"eval/*": "last", "train/entropy": "last", "leakage/*": "mean"}
"""Run summaries: the final evaluation (what Optuna's ``optimized_metric`` reads too; a maximum of overconfidence
or of a noisy accuracy would mislead), the final entropy, leakage averaged over training."""


KNOWN_NOTICES = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of an old torch name
    r"Found \d+ module\(s\) in eval mode",  # the EMA teacher is frozen in eval mode on purpose
    r"You have overridden `transfer_batch_to_device`",  # the module keeps examples as plain objects on purpose
    r"Experiment logs directory .* exists and is not empty",  # a resumed run keeps its metrics.csv rows itself
)
"""Warnings a run raises by design, each a regular expression matched at the start of the message."""
ADVERTS = ("💡 Tip:",)
"""Starts of Lightning's log lines that advertise rather than inform."""


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(ADVERTS)


DROP_ADVERTS = _DropAdverts()

def quiet_known_notices() -> None:
    """Silence what a run prints by design (:data:`KNOWN_NOTICES`, :data:`ADVERTS`) and print Lightning's own log
    lines once: through the root logger's handlers (Hydra's console and ``train.log``) when there are any, not a
    second time through Lightning's."""
    for pattern in KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
    root_has_handlers = bool(logging.getLogger().handlers)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if root_has_handlers:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DROP_ADVERTS)  # added once however often


def wandb_login() -> tuple[str, str | None]:
    """``(server, problem)``: the W&B server ``wandb`` is set to (``WANDB_BASE_URL``, else the host of the last
    ``wandb login --host``, else api.wandb.ai) and why ``wandb`` could not log in to it, None when it could.

    ``wandb`` itself decides, as ``wandb.init`` does before an online run: an API key in ``WANDB_API_KEY`` or in
    its settings, an identity token file (``WANDB_IDENTITY_TOKEN_FILE``), or a netrc entry for that server
    (what ``wandb login`` writes). Only files and the environment are read: nothing is sent to the server.
    """
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    server = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    try:
        auth = wbauth.authenticate_session(host=server, source="demopsd", prompt=False, update_session=False)
    except AuthenticationError as error:
        return server.url, f"the W&B credentials for {server.url} are unusable: {error}"
    if auth is None:
        return server.url, (f"wandb has no login for {server.url} (`wandb login --host {server.url}`, "
                            "WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE)")
    return server.url, None


def has_wandb_credentials() -> bool:
    """True when ``wandb`` would log in to the server it is set to (:func:`wandb_login`)."""
    return wandb_login()[1] is None


def resolve_wandb_mode(mode: str) -> tuple[str, str]:
    """The mode a run starts W&B in, and why: ``WANDB_MODE`` in the environment wins; ``auto`` is ``online`` when
    ``wandb`` has a login (:func:`wandb_login`), else ``offline``."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r} is invalid: one of {WANDB_MODES} is accepted")
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], f"WANDB_MODE={os.environ['WANDB_MODE']} in the environment"
    if mode != "auto":
        return mode, f"logger.wandb.mode={mode}"
    server, problem = wandb_login()
    return ("offline", problem) if problem else ("online", f"logged in to {server}")


def make_wandb_logger(
    wandb_cfg, *, save_dir: Path, run_name: str, config: dict, run_id: str | None = None
) -> WandbLogger | None:
    """A started W&B logger writing under ``save_dir/wandb``, or None (with a warning) if W&B cannot start.

    ``run_id``: continue that run (same id, charts carry on) rather than start a new one.
    An online start that fails (no network, bad key) falls back to offline; ``wandb sync`` uploads it later.
    """
    mode, why = resolve_wandb_mode(wandb_cfg.mode)
    if mode == "disabled" or rank_zero_only.rank > 0:  # W&B runs in the first process; Lightning logs from there
        return None
    import wandb

    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            logger = WandbLogger(
                name=run_name,
                save_dir=str(save_dir),
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                group=wandb_cfg.group,
                job_type=wandb_cfg.job_type,
                tags=list(wandb_cfg.tags),
                config=config,
                mode=attempt,
                id=run_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
            # Lightning hands W&B its retired `anonymous` setting on every run, which W&B then warns about.
            logger._wandb_init.pop("anonymous", None)
            define_metrics(logger.experiment)  # `.experiment` starts the run now, so that failures surface here
            if attempt == "online":
                log.info("W&B run: %s", logger.experiment.url)
            else:
                log.info("W&B is offline (%s); the run is uploaded after it ends with `wandb sync %s`",
                         why, offline_dir(logger))
            return logger
        except Exception as error:  # noqa: BLE001 - W&B must never take a run down
            log.warning("W&B could not start in %s mode (%s); continuing", attempt, error)
            why = f"the {attempt} start failed"
    log.warning("W&B is off for this run; metrics.csv in %s still has every metric", save_dir)
    return None


def define_metrics(run) -> None:
    """Chart every metric family of ``run`` over ``trainer/global_step`` and set the run summaries.

    Summaries: ``eval/*`` the maximum over evaluations (the value the W&B sweeps optimise), ``train/entropy``
    the last value, ``leakage/*`` the mean over steps. A W&B that refuses only costs a warning.
    """
    try:
        run.define_metric(STEP_METRIC)
        for pattern in STEPPED_METRICS:
            run.define_metric(pattern, step_metric=STEP_METRIC, summary=METRIC_SUMMARIES.get(pattern))
        for name, summary in METRIC_SUMMARIES.items():
            if name not in STEPPED_METRICS:  # an exact name beside its family's glob (exact names take precedence)
                run.define_metric(name, step_metric=STEP_METRIC, summary=summary)
    except Exception as error:  # noqa: BLE001 - charts and summaries are a convenience, never worth a run
        log.warning("W&B metric definitions failed (%s); metrics are logged with W&B's defaults", error)


def offline_dir(logger: WandbLogger) -> Path:
    """The directory ``wandb sync`` uploads an offline run from (``<save_dir>/wandb/offline-run-…``)."""
    return Path(logger.experiment.dir).parent


def wandb_loggers(loggers) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def finish_wandb(loggers) -> None:
    """Close the W&B runs among ``loggers``, so that the next run of a multirun starts its own; for an offline
    run, say how to upload it."""
    for logger in wandb_loggers(loggers):
        try:
            offline = logger.experiment.settings.mode in ("offline", "dryrun")
            sync = offline_dir(logger) if offline else None
            logger.experiment.finish()
            if sync is not None:
                log.info("Upload this run to W&B with: wandb sync %s", sync)
        except Exception as error:  # noqa: BLE001 - the metrics are already on disk
            log.warning("W&B could not finish cleanly (%s); metrics.csv has every metric", error)


def alert(loggers, title: str, text: str) -> None:
    """A W&B alert (e-mail or Slack, as the user's W&B settings say) on each W&B run among ``loggers``."""
    for logger in wandb_loggers(loggers):
        try:
            import wandb

            logger.experiment.alert(title=title, text=text, level=wandb.AlertLevel.WARN)
        except Exception as error:  # noqa: BLE001 - the warning is in the log already
            log.warning("W&B alert failed (%s)", error)
