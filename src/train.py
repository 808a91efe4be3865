"""Train a policy with DemoPSD, SDPO, OPSD or GRPO.

    python src/train.py method=demopsd data=sciknoweval/biology    # the group defaults (what `python src/train.py` runs)
    python src/train.py experiment=leakage_laptop                 # the laptop job (`make train`): minutes on a CPU
    python src/train.py -m method=demopsd,sdpo,grpo data=sciknoweval/chemistry seed=0,1,2
    python src/train.py debug=smoke            # two tiny steps, to check the setup
    python src/train.py --cfg job              # print the composed config
    python src/train.py hparams_search=demopsd_optuna   # Optuna search; main() returns `optimized_metric`
    python src/train.py -m hydra/launcher=slurm trainer=ddp trainer.devices=8 seed=0,1,2   # one SLURM job per run
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import demopsd.config.store  # noqa: F401 - stores the settings' defaults, which conf/ extends
from demopsd.runtime.launch import name_the_launch, sweep_job

os.environ.setdefault("DEMOPSD_ROOT", str(Path(__file__).resolve().parents[1]))
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
name_the_launch()  # before Hydra composes the run directory: one name for every process of an srun/torchrun launch


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from demopsd.config.check import ConfigError, validate_config

    try:
        settings = validate_config(cfg)  # before transformers & Lightning load: a bad value stops the run in seconds
    except ConfigError as error:
        print(f"Invalid config ({len(error.problems)} problem(s)):\n{error}", file=sys.stderr)
        sys.exit(2)
    from demopsd.training.run import run  # after Hydra has parsed the command line: `--help` stays instant

    with sweep_job(__file__):
        return optimized_value(settings.optimized_metric, run(settings))


def optimized_value(name: str | None, metrics: dict[str, float]) -> float | None:
    """The last value of the metric ``optimized_metric`` names (what Hydra sweepers optimise); None if unset.

    ``metrics`` is what ``run`` returns: the last logged value of every training and evaluation metric.
    """
    if name is None:
        return None
    if name not in metrics:
        raise LookupError(
            f"optimized_metric={name!r} was not logged by this run; logged metrics: {', '.join(sorted(metrics)) or 'none'}"
        )
    return float(metrics[name])


if __name__ == "__main__":
    main()
