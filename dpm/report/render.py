"""Rendering: display tables, Markdown, CSV and LaTeX, and `write_report` (all files, atomically)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpm.checkpoint import atomic_write_bytes
from dpm.faults import fault_point
from dpm.report.frame import (
    BOOTSTRAP_MIN_N,
    BOOTSTRAP_RESAMPLES,
    COMPLETE,
    REFERENCE_CSV,
    REPORT_DIRNAME,
    RUNNING,
    TARGET_MISSED,
    VARIANT_LABEL,
)
from dpm.report.loading import load_runs
from dpm.report.plots import write_plots
from dpm.report.statistics import seed_statistics
from dpm.report.tables import load_reference, paper_table


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{v:+.2f}" if signed else f"{v:.2f}"
    return str(v)


def _pm(mean: float, std: float) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if std is None or math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


PAPER_TABLE_COLUMNS = [
    "table",
    "model",
    "dataset",
    "pruner",
    "target",
    "SL",
    "variant",
    "n",
    "top1 %",
    "Δtop1",
    "best %",
    "Δbest",
    "FLOPs %",
    "ΔFLOPs",
    "params %",
    "Δparams",
    "paper top1",
    "ours-paper top1",
    "paper FLOPs %",
    "ours-paper FLOPs",
    "paper params %",
    "base check",
]


def paper_table_display(table: pd.DataFrame) -> pd.DataFrame:
    """The paper table as text cells: mean ± std over seeds, signed deltas against base, the paper's
    numbers and ours minus theirs."""
    if table.empty:  # no complete run yet (e.g. a sweep whose only run failed): the header alone
        return pd.DataFrame(columns=PAPER_TABLE_COLUMNS)
    out = pd.DataFrame(
        {
            "table": table["table"].replace("", "-"),
            "model": table["model"],
            "dataset": table["dataset"],
            "pruner": table["pruner"],
            "target": table["target"].fillna("").replace("", "-"),
            "SL": table["sparse_learning"].map({True: "yes", False: "no"}).fillna("-"),
            "variant": table["variant"].map(lambda v: VARIANT_LABEL.get(v, v)),
            "n": table["n"],
            "top1 %": [_pm(m, s) for m, s in zip(table["top1_final_mean"], table["top1_final_std"])],
            "Δtop1": table["d_top1_final"].map(lambda v: _fmt(v, True)),
            "best %": [_pm(m, s) for m, s in zip(table["top1_best_mean"], table["top1_best_std"])],
            "Δbest": table["d_top1_best"].map(lambda v: _fmt(v, True)),
            "FLOPs %": [_pm(m, s) for m, s in zip(table["flops_remaining_pct_mean"], table["flops_remaining_pct_std"])],
            "ΔFLOPs": table["d_flops_remaining_pct"].map(lambda v: _fmt(v, True)),
            "params %": [
                _pm(m, s) for m, s in zip(table["params_remaining_pct_mean"], table["params_remaining_pct_std"])
            ],
            "Δparams": table["d_params_remaining_pct"].map(lambda v: _fmt(v, True)),
            "paper top1": table["paper_top1"].map(_fmt),
            "ours-paper top1": table["diff_top1"].map(lambda v: _fmt(v, True)),
            "paper FLOPs %": table["paper_flops_pct"].map(_fmt),
            "ours-paper FLOPs": table["diff_flops_pct"].map(lambda v: _fmt(v, True)),
            "paper params %": table["paper_params_pct"].map(_fmt),
            "base check": table["base_check"].fillna("") if "base_check" in table else "",
        }
    )
    # The paper prints deltas only on the +SP / +SR rows.
    for col in ("Δtop1", "Δbest", "ΔFLOPs", "Δparams"):
        out.loc[(table["variant"] == "base").to_numpy(), col] = ""
    if "setting" in table and table["setting"].fillna("").astype(bool).any():  # an ablation sweep
        out.insert(out.columns.get_loc("variant") + 1, "setting", table["setting"].fillna("").to_numpy())
    return out


def stats_display(stats: pd.DataFrame) -> pd.DataFrame:
    """Seed statistics as text cells; `includes 0` is flagged `YES` (the gain is not shown)."""

    def interval(lo: float, hi: float) -> str:
        return "-" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"

    return pd.DataFrame(
        {
            "table": stats["table"].replace("", "-"),
            "model": stats["model"],
            "dataset": stats["dataset"],
            "pruner": stats["pruner"],
            "target": stats["target"].fillna("").replace("", "-"),
            "SL": stats["sparse_learning"].map({True: "yes", False: "no"}).fillna("-"),
            "comparison": stats["comparison"],
            "metric": stats["metric"],
            "n": stats["n"],
            "mean diff": stats["mean_diff"].map(lambda v: _fmt(v, True)),
            "sd diff": stats["sd_diff"].map(_fmt),
            "95% t-interval": [interval(lo, hi) for lo, hi in zip(stats["ci_low"], stats["ci_high"])],
            "MDD (80%)": stats["mdd"].map(_fmt),
            "bootstrap 95%": [interval(lo, hi) for lo, hi in zip(stats["boot_low"], stats["boot_high"])],
            "includes 0": stats["includes_zero"].map({True: "YES", False: "no"}).fillna("n < 2"),
            "beat base": [f"{int(w)}/{int(n)}" for w, n in zip(stats["wins"], stats["n"])],
            "unpaired seeds": stats["unpaired_seeds"].replace("", "-"),
            "FLOPs gap": stats["flops_gap"].map(lambda v: _fmt(v, True)),
            "equal cost": stats["equal_cost"].map({True: "yes", False: "NO"}).fillna("-"),
            "budget": stats["budget"].fillna("-"),
        }
    )


PROBLEM_COLUMNS = ["run_dir", "status", "model", "dataset", "pruner", "variant", "seed", "problem"]
DUPLICATE_COLUMNS = ["run_dir", "duplicate_of", "status", "model", "dataset", "pruner", "variant", "seed", "top1_final"]


def problem_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed, incomplete and short-of-target runs (status != complete, or config.yaml without metrics.json)."""
    bad = frame[frame["status"] != COMPLETE]
    return bad.reindex(columns=PROBLEM_COLUMNS)


def problem_counts(problems: pd.DataFrame) -> tuple[int, int, int]:
    """(short of their target, failed or incomplete, running in another process) among `problems`
    (problem_runs). A running run is another process's business: no failure of this report's sweep."""
    missed = int((problems["status"] == TARGET_MISSED).sum())
    running = int((problems["status"] == RUNNING).sum())
    return missed, len(problems) - missed - running, running


def duplicate_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Every run of a config and seed that ran more than once, with the run dir that was kept."""
    groups = frame[frame["duplicate_of"].notna()]["dup_key"].unique()
    dups = frame[frame["dup_key"].isin(groups)].sort_values(["dup_key", "mtime"])
    return dups.reindex(columns=DUPLICATE_COLUMNS)


def _markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)"
    # disable_numparse: cells are already formatted text ("+0.56" must keep its sign)
    return frame.to_markdown(index=False, disable_numparse=True)


def _latex(frame: pd.DataFrame, caption: str) -> str:
    if frame.empty:
        return f"% {caption}: none\n"
    text = frame.to_latex(index=False, escape=True, caption=caption, float_format="%.2f")
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


@dataclass
class Report:
    """Everything a report holds; `write_report` returns it."""

    runs: pd.DataFrame
    table: pd.DataFrame
    stats: pd.DataFrame
    problems: pd.DataFrame
    duplicates: pd.DataFrame
    markdown: str
    out: Path
    files: list[Path]


def render_markdown(
    runs: pd.DataFrame,
    table: pd.DataFrame,
    stats: pd.DataFrame,
    problems: pd.DataFrame,
    duplicates: pd.DataFrame,
    dirs: Sequence[str | os.PathLike],
) -> str:
    """The whole report as one Markdown document (also what the CLI prints)."""
    n_ok = int((runs["status"] == COMPLETE).sum())
    n_missed, n_failed, n_running = problem_counts(problems)
    parts = [
        "# dpm report",
        "",
        f"{len(runs)} run dirs under {', '.join(map(str, dirs))}: {n_ok} complete, {n_missed} short of their "
        f"pruning target, {n_failed} failed or incomplete, "
        + (f"{n_running} running in another process, " if n_running else "")
        + f"{int(runs['duplicate_of'].notna().sum())} duplicates left out.",
        "",
        "## Paper table",
        "",
        "Mean ± std over seeds (complete runs, one per config and seed). `top1 %` is the final test "
        "accuracy (headline), `best %` the best over fine-tune epochs (Torch-Pruning reports best). "
        "Δ = mean minus the block's base mean. Paper numbers: results/paper/reference_results.csv.",
        "",
        _markdown(paper_table_display(table)) if len(table) else "(no complete runs)",
        "",
        "## Seed statistics (paired by seed)",
        "",
        "Difference = variant minus base on the same seed (same pretrained checkpoint). 95% t-interval: "
        "mean ± t(0.975, n-1)·sd/√n. MDD (80% power): (t(0.975, n-1) + t(0.80, n-1))·sd/√n, the "
        "smallest true difference these seeds would detect 4 times in 5. Bootstrap (percentile, "
        f"{BOOTSTRAP_RESAMPLES} resamples) only when n >= {BOOTSTRAP_MIN_N}. `includes 0` = YES: the "
        "difference is not shown by these seeds.",
        "",
        _markdown(stats_display(stats)) if len(stats) else "(no base / variant pairs)",
        "",
        "## Failed and incomplete runs",
        "",
        "Never aggregated: failed, killed or unfinished runs, runs that ended short of their pruning "
        "target (status `target_missed`, `problem` says what they reached), and runs another process "
        "is still running (status `running`: their run.lock is held).",
        "",
        _markdown(problems),
        "",
        "## Duplicates (same config except run-time keys, same seed)",
        "",
        "Only the newest complete run of each is aggregated.",
        "",
        _markdown(duplicates),
        "",
    ]
    return "\n".join(parts)


def write_report(
    dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    plots: bool = True,
) -> Report:
    """Read the runs under `dirs` and write the report into `out` (default `<first dir>/report`):
    report.md (everything), tables.tex, runs.csv, paper_table.csv, stats.csv, problems.csv,
    duplicates.csv and plots/*.png|pdf. Every file is written atomically. Raises NoRunsError."""

    out = Path(out) if out is not None else Path(dirs[0]) / REPORT_DIRNAME
    runs = load_runs(dirs)
    ref = load_reference(reference or REFERENCE_CSV)
    table = paper_table(runs, ref)
    stats = seed_statistics(runs)
    problems = problem_runs(runs)
    duplicates = duplicate_runs(runs)
    markdown = render_markdown(runs, table, stats, problems, duplicates, dirs)
    latex = "\n".join(
        [
            _latex(paper_table_display(table), "DPM: ours (mean $\\pm$ std over seeds) against the paper"),
            _latex(stats_display(stats), "Paired differences against base over seeds (95\\% t-intervals)"),
        ]
    )
    files: dict[str, bytes] = {
        "report.md": markdown.encode(),
        "tables.tex": latex.encode(),
        "runs.csv": runs.to_csv(index=False).encode(),
        "paper_table.csv": table.to_csv(index=False).encode(),
        "stats.csv": stats.to_csv(index=False).encode(),
        "problems.csv": problems.to_csv(index=False).encode(),
        "duplicates.csv": duplicates.to_csv(index=False).encode(),
    }
    written = []

    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        written.append(out / name)
        fault_point("report:after_first_file")  # tests: a kill while the report is half written
    if plots:
        written += write_plots(runs, ref, out / "plots")
    return Report(runs, table, stats, problems, duplicates, markdown, out, written)
