"""Experiment loggers: `none` (metrics.json only) and Weights & Biases.

A logger is a callable `logger(metrics)` with a `log_every` attribute (0: per-epoch records only)
and `finish(summary)`. `dpm.train.train_phase` calls it with one record per epoch and, every
`log_every` optimizer steps, one per-step record (loss, lr, the DPM counters).

W&B layout (one W&B run per dpm run):
- group = `<model>-<dataset>-<pruner>-<variant>` (or `logger.group`), so seeds and stages of one
  setting sit together;
- job_type = `run`: the stages (pretrain / sparse / finetune) share the run, and each metric name
  carries its stage as a prefix (`pretrain/loss`, `finetune/test_top1`) with its own x-axis
  (`<stage>/step`, optimizer steps within that stage);
- tags = `logger.tags` + the run's `table` (when set) + `ablation`, `ablation:<name>` (when set);
- config = the resolved config as a plain dict; summary = metrics.json's scalar fields;
- a failed run is finished with exit_code=1 (marked failed in W&B); a pre-empted one is marked
  preempting and continues under the same W&B id when its job is requeued (`<run_dir>/wandb_id`).
"""

from __future__ import annotations

import logging
import secrets
import string
from pathlib import Path
from typing import Any

from dpm.checkpoint import atomic_write_bytes
from dpm.errors import UserError

log = logging.getLogger(__name__)

#: Stages of a run; each gets `<stage>/step` as the x-axis of its `<stage>/*` metrics.
STAGES = ("pretrain", "sparse", "finetune")
#: The job_type of a training run (stages are metric prefixes) and of a report.
RUN_JOB_TYPE = "run"
REPORT_JOB_TYPE = "report"


class NullLogger:
    """Logs nothing beyond the run's own files."""

    log_every = 0  # no per-step records: the training loop skips them entirely

    def __call__(self, metrics: dict) -> None:
        return None

    def finish(self, summary: dict) -> None:
        return None


def wandb_group(config: dict) -> str:
    """`<model>-<dataset>-<pruner>-<variant>` from a resolved config."""

    def name(section: str, key: str = "name") -> str:
        node = config.get(section) or {}
        return str(node.get(key)) if isinstance(node, dict) and node.get(key) is not None else "none"

    return "-".join([name("model"), name("dataset"), name("pruner"), name("dpm", "variant")])


def wandb_tags(cfg: Any, config: dict) -> list[str]:
    """`logger.tags` plus the run's table (and `ablation` when the config has a true `ablation` key)."""
    tags = [str(t) for t in (cfg.tags or [])]
    if config.get("table"):
        tags.append(str(config["table"]))
    if config.get("ablation"):
        tags.extend(["ablation", f"ablation:{config['ablation']}"])
    return list(dict.fromkeys(tags))  # W&B rejects nothing, but duplicates clutter the UI


class WandbLogger:
    """One W&B run per dpm run: resolved config, per-step and per-epoch metrics, the final metrics
    as the summary. See the module docstring for group / job_type / tags."""

    def __init__(self, cfg: Any, config: dict, run_dir: Path):
        import wandb  # deferred: slow to import, and only logger=wandb needs it

        self.wandb = wandb
        self.log_every = max(int(getattr(cfg, "log_every", 0) or 0), 0)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            mode=cfg.mode,
            id=stable_run_id(run_dir),
            resume="allow",
            group=cfg.group or wandb_group(config),
            job_type=RUN_JOB_TYPE,
            tags=wandb_tags(cfg, config),
            config=config,
            dir=str(run_dir),
            name=run_dir.name,
            reinit="finish_previous",
        )
        for stage in STAGES:
            # Per-stage x-axes: a resumed or cached stage does not shift the other stages' curves.
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def __call__(self, metrics: dict) -> None:
        self.run.log(metrics)

    def finish(self, summary: dict) -> None:
        """Write the summary and finish the W&B run, always: a failed dpm run (status != complete)
        is finished with exit_code=1 so that W&B marks it failed."""
        failed = summary.get("status") != "complete"
        try:
            for key, value in summary.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    self.run.summary[key] = value
            if summary.get("status") == "preempted":
                self.run.mark_preempting()  # the requeued job resumes this W&B run
        finally:
            # SLURM may already have killed W&B's service process at pre-emption: a logging error
            # must not replace the run's own outcome.
            try:
                self.run.finish(exit_code=1 if failed else 0)
            except Exception:  # noqa: BLE001
                log.warning("could not finish the W&B run", exc_info=True)


def stable_run_id(run_dir: Path) -> str:
    """Made once and kept in `<run_dir>/wandb_id`, so a requeued or resumed run logs to the same W&B run."""
    path = Path(run_dir) / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
    atomic_write_bytes(path, run_id.encode())
    return run_id


def make_logger(cfg: Any, config: dict, run_dir: Path) -> NullLogger | WandbLogger:
    """The logger a `logger` config node asks for."""
    if cfg.name == "none":
        return NullLogger()
    if cfg.name == "wandb":
        return WandbLogger(cfg, config, run_dir)
    raise UserError(f"unknown logger.name '{cfg.name}'; valid: none, wandb")
