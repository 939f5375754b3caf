"""The report logged to Weights & Biases: tables as W&B Tables, plots as images, one run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from dpm.report.frame import COMPLETE, RUN_COLUMNS
from dpm.report.render import Report, paper_table_display, problem_counts, stats_display


def _wandb_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A frame W&B's Table accepts: numeric columns as they are, every other column as text (mixed
    None / bool / str columns make wandb.Table guess a type and refuse the rest)."""
    out = frame.reset_index(drop=True).copy()
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]) or pd.api.types.is_bool_dtype(out[col]):
            out[col] = out[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    out.columns = [str(c) for c in out.columns]
    return out


def log_report_to_wandb(
    report: Report, mode: str | None = None, project: str = "dpm", entity: str | None = None
) -> Path:
    """Log a written report into one W&B run (job_type `report`): the paper table, the seed
    statistics, the runs, the failed/incomplete runs and the duplicates as W&B Tables (display
    text, as in report.md; the numeric paper table too), every PNG plot as an image, and the counts
    as the summary. `mode` None: WANDB_MODE, else online. The W&B files go to `<report dir>/wandb`.
    Returns the W&B run's local dir."""
    import wandb  # deferred: wandb is slow to import and only --wandb / logger=wandb need it

    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        job_type="report",
        name=f"report-{report.out.resolve().parent.name}",
        dir=str(report.out),
        config={"report_dir": str(report.out), "runs": int(len(report.runs))},
        reinit="finish_previous",
    )
    try:
        run_columns = [c for c in [*RUN_COLUMNS, "run_dir"] if c in report.runs]
        tables = {
            "paper_table": paper_table_display(report.table) if len(report.table) else report.table,
            "paper_table_numeric": report.table,
            "seed_statistics": stats_display(report.stats) if len(report.stats) else report.stats,
            "runs": report.runs[run_columns],
            "problems": report.problems,
            "duplicates": report.duplicates,
        }
        payload: dict[str, Any] = {name: wandb.Table(dataframe=_wandb_frame(frame)) for name, frame in tables.items()}
        for path in report.files:
            if path.suffix == ".png":
                payload[f"plots/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        run.summary.update(
            {
                "runs": int(len(report.runs)),
                "complete": int((report.runs["status"] == COMPLETE).sum()),
                "failed_or_incomplete": problem_counts(report.problems)[1],
                "duplicates": int(report.runs["duplicate_of"].notna().sum()),
            }
        )
        run_dir = Path(run.dir).parent  # run.dir is <run>/files
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    return run_dir
