"""Train a policy with DemoPSD, SDPO, OPSD or GRPO.

    python src/train.py method=demopsd data=sciknoweval/biology
    python src/train.py -m method=demopsd,sdpo,grpo data=sciknoweval/chemistry seed=0,1,2
    python src/train.py debug=smoke            # two tiny steps, to check the setup
    python src/train.py --cfg job              # print the composed config
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("DEMOPSD_ROOT", str(Path(__file__).resolve().parents[1]))
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from demopsd.training import run  # after Hydra has parsed the command line: `--help` stays instant

    run(cfg)


if __name__ == "__main__":
    main()
