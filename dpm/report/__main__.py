"""`python -m dpm.report <dir>...`: write the report of finished runs and print it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from dpm.report.frame import REFERENCE_CSV
from dpm.report.loading import NoRunsError
from dpm.report.render import write_report
from dpm.report.wandb_log import log_report_to_wandb


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dpm.report <dir>... [--out DIR] [--reference CSV] [--no-plots] [--wandb ...]`: write
    the report and print it (and log it to W&B with --wandb). Exit status 2 with one line for bad
    input (no runs, not a directory)."""
    parser = argparse.ArgumentParser(prog="python -m dpm.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="directories holding run dirs (searched recursively)")
    parser.add_argument("--out", help="report dir (default: <first dir>/report)")
    parser.add_argument("--reference", default=str(REFERENCE_CSV), help="the paper's numbers (CSV)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the tables (W&B Tables) and plots (images) into one W&B run, job_type report",
    )
    parser.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        help="W&B mode (default: $WANDB_MODE, else online); offline files go to <out>/wandb",
    )
    parser.add_argument("--wandb-project", default="dpm", help="W&B project (default: dpm)")
    args = parser.parse_args(argv)
    if not Path(args.reference).is_file():
        print(
            f"error: --reference={args.reference} does not exist: give the paper's reference_results.csv",
            file=sys.stderr,
        )
        return 2
    try:
        report = write_report(args.dirs, args.out, args.reference, plots=not args.no_plots)
    except NoRunsError as err:
        print(f"error: {err}: give the output dir of a run or sweep (e.g. outputs/quickstart)", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"report: {report.out} ({len(report.files)} files)")
    if args.wandb:
        print(f"W&B run: {log_report_to_wandb(report, mode=args.wandb_mode, project=args.wandb_project)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
