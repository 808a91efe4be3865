"""Evaluate a trained policy (or the base model) on held-out questions.

    python src/eval.py ckpt_path=outputs/train/runs/<run>              # in-domain test split of data=
    python src/eval.py ckpt_path=<run> eval=gpqa eval.k=16              # plus GPQA-diamond, avg@16
    python src/eval.py model=qwen3_8b data=sciknoweval/chemistry        # the base model
    python src/eval.py model=qwen3_8b model.dtype=bfloat16 device=cuda  # half the memory of float32, on a GPU

It runs in one process, on a GPU where torch finds one (``device=auto``, the default) and else on the CPU.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import demopsd.config.store  # noqa: F401 - stores the settings' defaults, which conf/ extends

os.environ.setdefault("DEMOPSD_ROOT", str(Path(__file__).resolve().parents[1]))
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    from demopsd.config.check import ConfigError, validate_eval_config

    try:
        settings = validate_eval_config(cfg)  # before torch & transformers load: a bad value stops in seconds
    except ConfigError as error:
        print(f"Invalid config ({len(error.problems)} problem(s)):\n{error}", file=sys.stderr)
        sys.exit(2)
    from demopsd.evaluation.runner import run_evaluation

    run_evaluation(settings)


if __name__ == "__main__":
    main()
