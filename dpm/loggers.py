"""Experiment loggers: `none` (metrics.json only) and Weights & Biases."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullLogger:
    """Logs nothing beyond the run's own files."""

    def log(self, metrics: dict) -> None:
        return None

    def finish(self, summary: dict) -> None:
        return None


class WandbLogger:
    """One W&B run per dpm run: resolved config, per-epoch metrics, final metrics as the summary."""

    def __init__(self, cfg: Any, config: dict, run_dir: Path):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group,
                              tags=list(cfg.tags), config=config, dir=str(run_dir), name=run_dir.name,
                              reinit="finish_previous")

    def log(self, metrics: dict) -> None:
        self.run.log(metrics)

    def finish(self, summary: dict) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                self.run.summary[key] = value
        self.run.finish()


def make_logger(cfg: Any, config: dict, run_dir: Path) -> NullLogger | WandbLogger:
    """The logger a `logger` config node asks for."""
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, config, run_dir)
    from dpm.errors import UserError

    raise UserError(f"unknown logger.name '{cfg.name}'; valid: none, wandb")
