"""Tables of runs. Reads metrics.json dicts into pandas and lays them out for the terminal.

The quickstart prints `format_runs`; the paper tables (base / +SP / +SR against the paper, seed
statistics) build on `runs_frame`.
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd

# metrics.json field -> column title, in display order.
RUN_COLUMNS = {
    "model": "model", "dataset": "dataset", "pruner": "pruner", "variant": "variant", "seed": "seed",
    "top1_final": "top1 %", "top1_best": "best %", "top1_best_epoch": "@ep",
    "pruned_macs_m": "MACs (M)", "pruned_params_m": "params (M)",
    "flops_remaining_pct": "MACs %", "params_remaining_pct": "params %", "speedup": "speed-up",
    "rounds_done": "rounds", "N": "N", "admitted": "admitted", "released": "released", "pruned": "removed",
    "wall_time_s": "time (s)", "status": "status",
}


def runs_frame(runs: Iterable[dict]) -> pd.DataFrame:
    """One row per run, with MACs and params also in millions."""
    frame = pd.DataFrame(list(runs))
    for key in ("pruned_macs", "pruned_params", "base_macs", "base_params"):
        if key in frame:
            frame[f"{key}_m"] = frame[key] / 1e6
    return frame


def format_runs(runs: Iterable[dict]) -> str:
    """A fixed-width table of runs (what `python -m dpm` prints)."""
    frame = runs_frame(runs)
    columns = [c for c in RUN_COLUMNS if c in frame]
    table = frame[columns].rename(columns=RUN_COLUMNS)
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")
