"""Build the warmed default model: the format warm-up (src/demopsd/training/warmup.py), once, into the model cache.

    python src/warmup.py                       # ~/.cache/demopsd/models/smollm2-135m-instruct-format-warmup
    python src/warmup.py --cache-dir /data/c   # or $DEMOPSD_CACHE_DIR
    python src/warmup.py --kind inferable --steps 30 --lr 1e-4 --out /tmp/warmup-inferable   # a variant

The laptop job and its benchmarks start from this model (model.name_or_path=smollm2-135m-instruct-format-warmup);
a training run that names it builds it first when it is missing. Its settings and losses are in warmup.json
beside the weights. A variant (any setting given) is written to --out, never to the cache. Evaluate either like
any base model:

    python src/eval.py experiment=leakage_laptop eval.max_examples=100
    python src/eval.py experiment=leakage_laptop model.name_or_path=/tmp/warmup-inferable
"""

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from demopsd.runtime.models import WARMED_MODEL, cached_model_path
from demopsd.training.warmup import WARMUP_KINDS, WarmupConfig, build_warmed_model, stale_build, warm_up


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, WarmupConfig]:
    """The arguments and the warm-up settings they give (the defaults where none is given)."""
    defaults = WarmupConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None,
                        help="model cache root (default: $DEMOPSD_CACHE_DIR or ~/.cache/demopsd)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="questions per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--kind", choices=WARMUP_KINDS, default=defaults.kind,
                        help="which synthetic questions it trains on (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="where a variant is written (required with any setting)")
    args = parser.parse_args(argv)
    try:
        config = WarmupConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, kind=args.kind)
    except ValueError as error:
        parser.error(str(error))
    if config != defaults and args.out is None:
        parser.error("a variant of the warm-up needs --out DIR: the model cache holds only the default build")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists; name a new directory")
    return args, config


def main(argv: list[str] | None = None) -> int:
    args, config = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out is not None:
        print(f"warm-up {dataclasses.asdict(config)} written to {warm_up(args.out, config, args.cache_dir)}")
        return 0
    target = cached_model_path(WARMED_MODEL, args.cache_dir)
    if target.is_dir() and not stale_build(target, config):
        print(f"{WARMED_MODEL} is already built: {target} (delete it to build it again)")
        return 0
    print(f"{WARMED_MODEL} written to {build_warmed_model(args.cache_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
