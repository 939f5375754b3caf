"""Tables of runs, as a package: frame (columns, statuses), loading, tables, statistics, render,
plots, wandb_log, __main__. Reads metrics.json dicts into pandas and lays them out for the terminal, and turns
directories of runs into a report against the paper.

    python -m dpm.report outputs/depgraph_resnet56_cifar10 [more dirs...] [--out DIR] [--no-plots]
                         [--wandb [--wandb-mode offline] [--wandb-project P]]

The quickstart prints `format_runs`; the paper tables (base / +SP / +SR against the paper, seed
statistics) build on `runs_frame`:

- `load_runs(dirs)`: one row per run dir (metrics.json + its config flattened into `cfg.*` columns),
  with `status` (`complete`, `failed`, `running`, `missing` = config.yaml but no metrics.json),
  `dup_key` / `duplicate_of` for runs that repeat a config and seed.
- `paper_table(frame, reference)`: mean / std / n over seeds per (table, model, dataset, pruner,
  sparse_learning, variant), deltas against base, the paper's numbers beside ours.
- `seed_statistics(frame)`: paired-by-seed 95% t-intervals of +SP / +SR minus base, n, the minimum
  detectable difference, a bootstrap interval when n >= 10, the seeds won;
  `paired_differences(frame)`: the per-seed differences they come from.
- `write_report(dirs, out)`: all of it as Markdown, CSV, LaTeX and plots (PNG + PDF), atomically.
- `log_report_to_wandb(report)`: the tables as W&B Tables and the plots as images, one W&B run.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from dpm.report.frame import (
    AGG_METRICS,
    BLOCK_KEYS,
    BOOTSTRAP_MIN_N,
    BOOTSTRAP_RESAMPLES,
    COMPLETE,
    CONFIDENCE,
    GROUP_KEYS,
    MISSING,
    POWER,
    REFERENCE_CSV,
    REPORT_DIRNAME,
    RUN_COLUMNS,
    STAT_METRICS,
    TARGET_MISSED,
    VARIANT_LABEL,
    VARIANT_ORDER,
    format_runs,
    runs_frame,
)
from dpm.report.loading import (
    CHOICE_FACETS,
    SETTING_FACETS,
    NoRunsError,
    aggregated_runs,
    find_run_dirs,
    load_run,
    load_runs,
    run_settings,
)
from dpm.report.plots import (
    ABLATION_FACETS,
    ABLATION_METRICS,
    CATEGORICAL_FACETS,
    ablation_facets,
    file_label,
    plot_ablation,
    plot_accuracy_vs_flops,
    plot_released,
    plot_trajectories,
    pyplot,
    run_labels,
    trajectories_to_draw,
    write_plots,
)
from dpm.report.render import (
    DUPLICATE_COLUMNS,
    PAPER_TABLE_COLUMNS,
    PROBLEM_COLUMNS,
    Report,
    duplicate_runs,
    paper_table_display,
    problem_counts,
    problem_runs,
    render_markdown,
    stats_display,
    write_report,
)
from dpm.report.statistics import (
    PairedInterval,
    minimum_detectable,
    paired_differences,
    paired_interval,
    seed_statistics,
)
from dpm.report.tables import BASE_TOLERANCE, base_checks, load_reference, match_reference, paper_table
from dpm.report.wandb_log import log_report_to_wandb

__all__ = [
    "RUN_COLUMNS",
    "REFERENCE_CSV",
    "GROUP_KEYS",
    "BLOCK_KEYS",
    "AGG_METRICS",
    "STAT_METRICS",
    "VARIANT_ORDER",
    "VARIANT_LABEL",
    "COMPLETE",
    "TARGET_MISSED",
    "MISSING",
    "CONFIDENCE",
    "POWER",
    "BOOTSTRAP_MIN_N",
    "BOOTSTRAP_RESAMPLES",
    "REPORT_DIRNAME",
    "runs_frame",
    "format_runs",
    "NoRunsError",
    "find_run_dirs",
    "load_run",
    "CHOICE_FACETS",
    "load_runs",
    "aggregated_runs",
    "SETTING_FACETS",
    "run_settings",
    "load_reference",
    "match_reference",
    "paper_table",
    "BASE_TOLERANCE",
    "base_checks",
    "PairedInterval",
    "paired_differences",
    "minimum_detectable",
    "paired_interval",
    "seed_statistics",
    "PAPER_TABLE_COLUMNS",
    "paper_table_display",
    "stats_display",
    "PROBLEM_COLUMNS",
    "DUPLICATE_COLUMNS",
    "problem_counts",
    "problem_runs",
    "duplicate_runs",
    "Report",
    "render_markdown",
    "write_report",
    "file_label",
    "pyplot",
    "plot_accuracy_vs_flops",
    "trajectories_to_draw",
    "plot_trajectories",
    "ABLATION_FACETS",
    "CATEGORICAL_FACETS",
    "ABLATION_METRICS",
    "ablation_facets",
    "plot_ablation",
    "plot_released",
    "run_labels",
    "write_plots",
    "log_report_to_wandb",
    "report_runs",
]


def report_runs(dirs: Sequence[str | os.PathLike], logger_cfg: Any = None, plots: bool = True) -> Report:
    """`write_report`, and with `logger_cfg.name == "wandb"` (the runs logged to W&B) the report
    logged there too: what the quickstart and the multirun callback end with."""
    report = write_report(dirs, plots=plots)
    if logger_cfg is not None and logger_cfg.name == "wandb":
        log_report_to_wandb(report, mode=logger_cfg.mode, project=logger_cfg.project, entity=logger_cfg.entity)
    return report
