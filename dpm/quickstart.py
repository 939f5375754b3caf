"""`python -m dpm` with no arguments: DepGraph base / +SP / +SR on the embedded digits data set
from one shared pretrained baseline, and one comparison table. About a minute on 2 CPU cores."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

VARIANTS = ("base", "sp", "sr")
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `python -m dpm <overrides>` would run (without Hydra's own node)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    import dpm.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def main(overrides: list[str] | None = None) -> list[dict]:
    """Run the three variants one after another into outputs/quickstart/<time>/<variant>/ and print
    the comparison. Returns the three metrics dicts."""
    from dpm.errors import UserError
    from dpm.report import format_runs
    from dpm.run import run

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s", stream=sys.stdout)
    configs = [compose(["experiment=quickstart", f"dpm={v}", *(overrides or [])]) for v in VARIANTS]
    root = Path(configs[0].output_root) / configs[0].name / time.strftime("%Y-%m-%d_%H-%M-%S")
    t0 = time.time()
    try:
        rows = [run(cfg, root / variant) for variant, cfg in zip(VARIANTS, configs)]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    first = rows[0]
    print(f"\ndpm quickstart: DepGraph on {first['model']} / {first['dataset']} ({first['train_size']} train "
          f"images, {first['device']}), speed-up target {first['speedup_target']}x, one shared pretrained "
          f"baseline ({first['top1_before_prune']:.2f}%), {time.time() - t0:.0f} s")
    print(format_runs(rows))
    print(f"\nruns: {root}/{{{','.join(VARIANTS)}}}/metrics.json")
    from dpm.report import report_runs

    report = report_runs([root], configs[0].logger)  # paper table, seed statistics, plots; W&B if logged there
    print(f"report: {report.out}/report.md (tables, CSV, LaTeX, plots)")
    return rows
