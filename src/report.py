"""Plots and a results table over training runs (any mix of run and multirun directories).

    python src/report.py outputs/multirun/2025-01-01/12-00-00
    python src/report.py runA runB --out reports/ab
    python src/report.py outputs/lr_sweep/runs --start outputs/lr_sweep/start --sweep optim.lr --out results/lr_sweep

Writes <quantity>.png (entropy, leakage, λ, reward, eval accuracy), results.md, results.csv and
runs.csv into --out (default: <first dir>/report); for runs on the synthetic leakage task also
leakage.md, leakage.csv, leakage_runs.csv and heldout_probe.png; with --sweep, sweep.md and sweep.csv. --start
names starting-model evaluations (src/eval.py) that stand for step 0 of the runs that skipped it.
"""

import argparse
import sys

from demopsd.report.leakage import LEAKAGE_RUNS_FILE
from demopsd.report.plots import write_report
from demopsd.report.start import NoFittingStartError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories (searched at any depth)")
    parser.add_argument("--out", default=None, help="output directory (default: <first dir>/report)")
    parser.add_argument("--start", nargs="+", default=[], metavar="DIR",
                        help="src/eval.py directories of the starting model, step 0 of runs that skipped it")
    parser.add_argument("--sweep", default=None, metavar="KEY",
                        help="a setting the runs differ in (optim.lr): sweep.md, one row per (method, value)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        files = write_report(args.dirs, args.out, start=args.start, sweep=args.sweep)
    except (FileNotFoundError, NoFittingStartError) as error:  # NoRunsError, or a path that does not exist: exit 2 with the message
        parser.error(str(error))
    print(f"Report on {files.runs} run(s) written to {files.out_dir}")
    print(f"  table: {files.table_md.name}, {files.table_csv.name}, {files.runs_csv.name}")
    if files.leakage_md is not None:
        print(f"  leakage table: {files.leakage_md.name}, {files.leakage_csv.name}, {LEAKAGE_RUNS_FILE}")
    if files.sweep_md is not None:
        print(f"  sweep table: {files.sweep_md.name}, {files.sweep_csv.name}")
    print(f"  plots: {', '.join(p.name for p in files.plots) if files.plots else 'none'}")
    for line in files.skipped:
        print(f"  skipped {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
