"""The main job of `python -m dpm [overrides]` (dispatched by dpm/cli.py): base / +SP / +SR of the
configured experiment and base pruner from one shared pretrained baseline, one comparison table and
the report. With no overrides: DepGraph on the embedded digits data set, seconds on 2 CPU cores;
`pruner=otov2` / `pruner=gate_decorator` take their digits recipes (conf/recipe/quickstart/)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from dpm.config import VARIANTS, compose
from dpm.errors import UserError
from dpm.report import format_runs, report_runs
from dpm.run import run, target_goal

PRUNER_LABELS = {"depgraph": "DepGraph", "otov2": "OTOv2", "gate_decorator": "Gate Decorator"}


def main(overrides: list[str] | None = None) -> list[dict]:
    """Run the three variants one after another into <output_root>/<name>/<time>/<variant>/ with
    `overrides` applied to each, print the comparison and write the report. Returns the three
    metrics dicts (a run short of its target has status `target_missed`)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", stream=sys.stdout)
    try:
        configs = [compose([*(overrides or []), f"dpm={v}"]) for v in VARIANTS]
        root = Path(configs[0].output_root) / configs[0].name / time.strftime("%Y-%m-%d_%H-%M-%S")
        t0 = time.time()
        rows = [run(cfg, root / variant) for variant, cfg in zip(VARIANTS, configs)]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    first = rows[0]
    print(
        f"\ndpm {first['name']}: {PRUNER_LABELS.get(first['pruner'], first['pruner'])} on {first['model']} / "
        f"{first['dataset']} ({first['train_size']} train images, {first['device']}), {target_goal(first)}, one "
        f"shared pretrained baseline ({first['top1_before_prune']:.2f}%), {time.time() - t0:.0f} s"
    )
    print(format_runs(rows))
    for r in rows:
        if r["status"] != "complete":
            print(f"{r['variant']}: {r['status']}: {r.get('error')}")
    print(f"\nruns: {root}/{{{','.join(VARIANTS)}}}/metrics.json")
    report = report_runs([root], configs[0].logger)  # paper table, seed statistics, plots; W&B if logged there
    print(f"report: {report.out}/report.md (tables, CSV, LaTeX, plots)")
    return rows
