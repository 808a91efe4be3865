"""Build the warmed default model: the format warm-up (src/demopsd/training/warmup.py), once, into the model cache.

    python src/warmup.py                       # ~/.cache/demopsd/models/smollm2-135m-instruct-format-warmup
    python src/warmup.py --cache-dir /data/c   # or $DEMOPSD_CACHE_DIR

The laptop job and its benchmarks start from this model (model.name_or_path=smollm2-135m-instruct-format-warmup);
a training run that names it builds it first when it is missing. Its settings and losses are in warmup.json
beside the weights. Evaluate it like any base model:

    python src/eval.py experiment=leakage_laptop eval.max_examples=100
"""

import argparse
import logging
import sys

from demopsd.runtime.models import WARMED_MODEL, cached_model_path
from demopsd.training.warmup import WarmupConfig, build_warmed_model, stale_build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="model cache root (default: $DEMOPSD_CACHE_DIR or ~/.cache/demopsd)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    target = cached_model_path(WARMED_MODEL, args.cache_dir)
    if target.is_dir() and not stale_build(target, WarmupConfig()):
        print(f"{WARMED_MODEL} is already built: {target} (delete it to build it again)")
        return 0
    print(f"{WARMED_MODEL} written to {build_warmed_model(args.cache_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
