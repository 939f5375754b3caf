"""The run table's columns and statuses, one row per run (`runs_frame`) and its terminal form (`format_runs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

RUN_COLUMNS = {
    "model": "model",
    "dataset": "dataset",
    "pruner": "pruner",
    "variant": "variant",
    "seed": "seed",
    "top1_final": "top1 %",
    "top1_best": "best %",
    "top1_best_epoch": "@ep",
    "pruned_macs_m": "MACs (M)",
    "pruned_params_m": "params (M)",
    "flops_remaining_pct": "MACs %",
    "params_remaining_pct": "params %",
    "speedup": "speed-up",
    "rounds_done": "rounds",
    "N": "N",
    "admitted": "admitted",
    "released": "released",
    "pruned": "removed",
    "wall_time_s": "time (s)",
    "status": "status",
}

REFERENCE_CSV = Path(__file__).resolve().parents[2] / "results" / "paper" / "reference_results.csv"
# What makes a paper-table row: one group of seeds. `target` is the pruning target a run aimed at
# (dpm.report.loading.pruning_target): one pruner at two compressions is two blocks.
GROUP_KEYS = ["table", "model", "dataset", "pruner", "target", "sparse_learning", "variant"]
BLOCK_KEYS = GROUP_KEYS[:-1]
# Aggregated over seeds; top1_final is the headline, top1_best is what Torch-Pruning reports.
AGG_METRICS = ["top1_final", "top1_best", "flops_remaining_pct", "params_remaining_pct"]
STAT_METRICS = ["top1_final", "top1_best"]
VARIANT_ORDER = {"base": 0, "sp": 1, "sr": 2}
VARIANT_LABEL = {"base": "base", "sp": "+SP", "sr": "+SR"}
# Runs whose metrics.json has any other status (or none) are failed/incomplete, never aggregated.
COMPLETE = "complete"
TARGET_MISSED = "target_missed"  # finished, but short of its pruning target: listed as a problem
MISSING = "missing"
RUNNING = "running"  # unfinished, and its run.lock is held by a live process: listed, not a failure
# A variant ran at equal cost when its mean paired FLOPs % is within this many points of its base's.
EQUAL_COST_POINTS = 1.5
CONFIDENCE = 0.95
POWER = 0.80
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES = 10_000
REPORT_DIRNAME = "report"


def runs_frame(runs: Iterable[dict]) -> pd.DataFrame:
    """One row per run, with MACs and params also in millions."""
    frame = pd.DataFrame(list(runs))
    for key in ("pruned_macs", "pruned_params", "base_macs", "base_params"):
        if key in frame:
            frame[f"{key}_m"] = frame[key] / 1e6
    return frame


def format_runs(runs: Iterable[dict] | pd.DataFrame) -> str:
    """A fixed-width table of runs (what `python -m dpm` prints)."""
    frame = runs if isinstance(runs, pd.DataFrame) else runs_frame(runs)
    columns = [c for c in RUN_COLUMNS if c in frame]
    table = frame[columns].rename(columns=RUN_COLUMNS)
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")
