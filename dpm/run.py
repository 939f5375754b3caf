"""Hydra entry point. One run = pretrain | load -> (prune, with DPM) -> fine-tune -> evaluate -> measure.

    python -m dpm                                   # the quickstart (digits, tiny CNN, CPU)
    python -m dpm experiment=cifar10_resnet20_cpu   # a real CIFAR-10 run

`run(cfg, run_dir)` does the work and is what tests call; `main` adds Hydra's CLI and output dirs.
Every run ends with `metrics.json` in its run dir, written atomically, `complete` or `failed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpm import data as dpm_data
from dpm import distributed
from dpm.checkpoint import atomic_write_bytes, atomic_write_json, seed_everything
from dpm.config import comparable_config, validate
from dpm.errors import UserError
from dpm.faults import fault_point
from dpm.loggers import NullLogger, make_logger
from dpm.measure import compare_models, count_macs_params, layer_widths, native_macs_params
from dpm.run_lock import run_dir_lock
from dpm.stages import stage_for
from dpm.stages.base import CHECKPOINT, RunContext, build_configured_model
from dpm.stages.baseline import PRETRAIN_PROGRESS, pretrain_key_fields, pretrained_baseline
from dpm.train import onednn_conv_safe, recalibrate_bn, resolve_device, resolve_speed

log = logging.getLogger("dpm")

# A run with one of these statuses is finished: run() returns its record instead of running it again.
FINISHED = ("complete", "target_missed")
# Re-exported: the run dir's file names and the pretrain cache key, as tests and experiments read them.
__all__ = [
    "run",
    "outcome",
    "target_goal",
    "target_text",
    "run_dir_lock",
    "CHECKPOINT",
    "PRETRAIN_PROGRESS",
    "FINISHED",
    "pretrain_key_fields",
]


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Execute one run described by a composed config and return its metrics (also in metrics.json).

    Raises UserError for bad input (after writing a `failed` metrics.json); the CLI turns it into
    one line on stderr.
    """
    joined = join_process_group(cfg)
    try:
        # Under DDP every rank works in rank 0's run dir (Hydra's timestamped dirs may differ).
        run_dir = Path(distributed.broadcast_object(str(run_dir)))
        if not distributed.is_main():
            verdict = distributed.broadcast_object(None)  # rank 0's refusal or go-ahead
            if verdict != "run":
                if isinstance(verdict, dict):
                    return verdict
                raise UserError(verdict)
            return _run_locked(cfg, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Refusals that must not touch what the run dir holds: a second process, or a changed config.
        with run_dir_lock(run_dir):
            try:
                refuse_changed_config(cfg, run_dir)
            except UserError as err:
                distributed.broadcast_object(str(err))
                raise
            previous = run_dir / "metrics.json"
            finished = json.loads(previous.read_text()) if previous.exists() else {}
            if finished.get("status") in FINISHED:
                log.info("run already finished (%s): %s", finished["status"], previous)
                distributed.broadcast_object(finished)
                return finished
            distributed.broadcast_object("run")
            return _run_locked(cfg, run_dir)
    finally:
        if joined:
            distributed.teardown()


def join_process_group(cfg: DictConfig) -> bool:
    """trainer.devices x trainer.nodes > 1: join the DDP process group (True if this call created it)."""
    t = cfg.trainer
    devices, nodes = OmegaConf.select(t, "devices", default=1), OmegaConf.select(t, "nodes", default=1)
    if devices * nodes <= 1 or distributed.is_initialized():
        return False
    distributed.setup(devices, nodes, resolve_device(t.device).type)
    return True


def _run_locked(cfg: DictConfig, run_dir: Path) -> dict:
    if not distributed.is_main():
        return _run_follower(cfg, run_dir)
    t0 = time.time()
    metrics: dict[str, Any] = identity_fields(cfg)
    metrics.update(run_dir=str(run_dir), git_sha=CODE_SHA, status="running")
    logger = None
    try:
        validate(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(resolved).encode())
        if cfg.resume:
            adopt_unfinished_run(cfg, run_dir)
        distributed.barrier()  # the other ranks read the checkpoints adopted here
        logger = make_logger(cfg.logger, resolved, run_dir)
        metrics.update(execute(cfg, run_dir, logger))  # callable; its log_every sets per-step logging
        metrics.update(outcome(metrics))
        fault_point("run:before_metrics")  # tests: a kill after the work, before its record
    except BaseException as err:
        # SystemExit here comes from submitit's signal handler: the job is pre-empted or timed out
        # and will be requeued to continue from its checkpoint.
        metrics["status"] = "preempted" if isinstance(err, SystemExit) else "failed"
        metrics["error"] = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        raise
    finally:
        metrics["wall_time_s"] = round(time.time() - t0, 3)
        try:
            atomic_write_json(run_dir / "metrics.json", metrics)
        except UserError:
            if metrics["status"] == "complete":
                raise  # the run's own record could not be written: that is the error
            log.error("could not write the failed metrics.json in %s", run_dir)  # the original error propagates
        if logger is not None:
            try:
                logger.finish(metrics)
            except Exception:  # noqa: BLE001  (a logging failure never replaces the run's outcome)
                log.warning("the logger failed to finish", exc_info=True)
    return metrics


def _run_follower(cfg: DictConfig, run_dir: Path) -> dict:
    """A DDP rank other than 0: the same work, with nothing written (no metrics.json, config,
    checkpoints or W&B: rank 0 writes them)."""
    validate(cfg)
    distributed.barrier()  # rank 0 adopts an unfinished run's checkpoints first (resume=true)
    metrics = identity_fields(cfg)
    metrics.update(run_dir=str(run_dir), rank=distributed.rank())
    metrics.update(execute(cfg, run_dir, NullLogger()))
    metrics.update(outcome(metrics))
    return metrics


def outcome(metrics: dict) -> dict:
    """A finished run's status: `complete` when it did what was asked, `target_missed` (with an
    `error` saying what it reached) when its pruner ended short of its target (`target_met` false)."""
    if metrics.get("target_met") is False:
        return {"status": "target_missed", "error": f"missed its pruning target: {target_text(metrics)}"}
    return {"status": "complete"}


def target_goal(metrics: dict) -> str:
    """The run's pruning target in its pruner's native units ("" without a pruner)."""
    pruner = metrics.get("pruner")
    if pruner == "depgraph":
        return f"speed-up target {metrics['speedup_target']:.2f}x"
    if pruner == "otov2":
        return f"group sparsity target {metrics['target_group_sparsity']:.2f}"
    if pruner == "gate_decorator":
        return f"FLOPs target <= {100 * metrics['flops_target']:.1f}% left"
    return ""


def target_text(metrics: dict) -> str:
    """The pruning target and what the run reached, in the pruner's native units."""
    pruner = metrics.get("pruner")
    reached = {
        "depgraph": lambda: f"{metrics['native_speedup']:.2f}x",
        "otov2": lambda: f"{metrics['group_sparsity']:.3f}",
        "gate_decorator": lambda: f"{100 * metrics['native_flops_remaining']:.1f}%",
    }.get(pruner)
    return f"{target_goal(metrics)}, reached {reached()}" if reached else f"target_met false ({pruner})"


def refuse_changed_config(cfg: DictConfig, run_dir: Path) -> None:
    """A run dir continues only the run it was started for: a config that differs in anything but
    run-time keys (RUNTIME_KEYS) is refused with the differing keys, unless `force_resume=true`."""
    saved = run_dir / "config.yaml"
    if not saved.exists() or OmegaConf.select(cfg, "force_resume", default=False):
        return
    try:
        new = comparable_config(OmegaConf.to_container(cfg, resolve=True))
    except Exception as err:  # an interpolation that cannot resolve: validate() reports it later
        log.debug("config not comparable yet: %s", err)
        return
    old = comparable_config(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    diff = config_diff(old, new)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise UserError(
            f"{run_dir} holds a run with another config ({shown}): give this run another run_id, or "
            f"force_resume=true to continue it with the new config"
        )


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two config containers."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += config_diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old} -> {new}"]


def identity_fields(cfg: DictConfig) -> dict:
    """What a run is, recorded even when it fails before doing anything."""

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, throw_on_missing=False, default=None)

    sr = get("dpm.variant") == "sr"  # thresholds an experiment sets for +SR mean nothing to base / +SP rows
    return {
        "name": get("name"),
        "table": get("table"),
        "ablation": get("ablation"),
        "model": get("model.name"),
        "dataset": get("dataset.name"),
        "pruner": get("pruner.name"),
        "variant": get("dpm.variant"),
        "seed": get("seed"),
        "N": get("dpm.N"),
        "T_rate": get("dpm.T_rate") if sr else None,
        "T_len": get("dpm.T_len") if sr else None,
    }


def execute(cfg: DictConfig, run_dir: Path, log_metrics) -> dict:
    """The stages of a run; returns the metrics they produce."""
    tcfg = cfg.trainer
    device = distributed.device_for(resolve_device(tcfg.device))
    speed = resolve_speed(tcfg, device)
    onednn = onednn_conv_safe() if device.type == "cpu" else None
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)
    data = dpm_data.build_data(cfg.dataset, cache_dir=cfg.cache_dir)
    model = build_configured_model(cfg).to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    eval_loaders = {
        "test": dpm_data.eval_loader(data, "test", speed.eval_batch_size, device, speed.channels_last, tcfg.num_workers)
    }
    if data.val is not None:
        eval_loaders["val"] = dpm_data.eval_loader(
            data, "val", speed.eval_batch_size, device, speed.channels_last, tcfg.num_workers
        )
    ctx = RunContext(
        cfg,
        model,
        run_dir,
        device,
        torch.zeros(data.example_shape, device=device),
        data,
        eval_loaders,
        log_metrics,
        speed=speed,
    )
    metrics = ctx.metrics
    metrics.update(
        {
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            # Results are bitwise reproducible at the same thread count only: record it.
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "world_size": distributed.world_size(),
            "fast": speed.fast,
            "bf16": speed.bf16,
            "channels_last": speed.channels_last,
            "compile": speed.compile,
            "fast_basis": speed.basis,
            "onednn_conv": onednn,  # False: an AVX2 CPU, whose oneDNN 1x1 kernel overflows (onednn_conv_safe)
            "train_size": len(data.train) if hasattr(data.train, "__len__") else None,
            "val_size": len(data.val) if data.val is not None else 0,
        }
    )
    # An infeasible plan fails now, not after hours of pretraining: each stage may check its own.
    stage = stage_for(cfg.pruner.name)
    stage.preflight(ctx)
    # Stage 1: the pretrained baseline (a given checkpoint, the shared cache, or trained here).
    metrics.update(pretrained_baseline(cfg, model, run_dir, ctx.run_phase))
    pretrain_summary = metrics.pop("pretrain_summary")

    # Stages 2 and 3: the base pruner with DPM, and fine-tuning.
    result = stage.run_stage(ctx)
    final_phase = result.pop("final_phase", None) or pretrain_summary
    if "top1_before_prune" not in metrics:
        ctx.mark_before_prune()
    metrics.update(result)
    model, example = ctx.model, ctx.example
    base_counts, native_base = metrics.pop("_base_counts"), metrics.pop("_native_base")

    # Stage 4: evaluate and measure the final model.
    if cfg.recalibrate_bn:
        recalibrate_bn(model, ctx.phase_loader("finetune"))
    metrics["top1_final"], metrics["test_loss_final"] = ctx.evaluate("test")
    if "val" in eval_loaders:
        metrics["val_top1_final"], _ = ctx.evaluate("val")
    if final_phase["epochs"]:
        metrics["top1_best"] = final_phase["test_top1_best"]
        metrics["top1_best_epoch"] = final_phase["test_top1_best_epoch"]
        if "val" in eval_loaders:
            metrics["val_top1_best"] = final_phase["val_top1_best"]
            metrics["val_top1_best_epoch"] = final_phase["val_top1_best_epoch"]
    else:  # a given checkpoint and no training: the only model seen is the final one
        metrics["top1_best"], metrics["top1_best_epoch"] = metrics["top1_final"], 0
    metrics["top1_best_phase"] = final_phase.get("phase", "pretrain")
    metrics.update(compare_models(base_counts, count_macs_params(model, example)))
    metrics["counter"] = "thop_conv_linear"
    metrics["widths"] = layer_widths(model)
    counter, native_macs, native_params = native_macs_params(model, example, cfg.pruner.name)
    metrics.update(
        native_counter=counter,
        native_base_macs=native_base[1],
        native_base_params=native_base[2],
        native_pruned_macs=native_macs,
        native_pruned_params=native_params,
    )
    epochs = {"pretrain": metrics.pop("pretrain_epochs")}
    epochs.update(metrics.pop("stage_epochs", {}))
    metrics["epochs"] = epochs
    skipped = pretrain_summary.get("skipped_steps", 0) + (
        final_phase.get("skipped_steps", 0) if final_phase is not pretrain_summary else 0
    )
    if cfg.trainer.on_nan == "skip_step":
        metrics["nonfinite_steps_skipped"] = skipped
    metrics["history"] = {
        "pretrain": pretrain_summary["history"],
        "finetune": final_phase["history"] if final_phase.get("phase") == "finetune" else [],
    }
    return metrics


def resume_files(run_dir: Path) -> list[Path]:
    """What a run dir needs to continue: its checkpoints (every stage's, with their kept
    predecessors) and its W&B id."""
    return sorted([*run_dir.glob("*.pt"), *run_dir.glob("*.pt.prev"), *run_dir.glob("wandb_id")])


def adopt_unfinished_run(cfg: DictConfig, run_dir: Path) -> None:
    """resume=true in a fresh run dir: continue the newest unfinished run of the same name whose
    config matches (apart from run-time keys) by copying its checkpoints here."""
    if any(p.suffix in (".pt", ".prev") for p in resume_files(run_dir)):
        return  # this run dir has its own checkpoint: resumed in place
    wanted = comparable_config(OmegaConf.to_container(cfg, resolve=True))
    candidates = sorted(
        (
            p.parent
            for p in Path(cfg.output_root, cfg.name).glob("*/config.yaml")
            if p.parent.resolve() != run_dir.resolve()
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for other in candidates:
        status = (
            json.loads((other / "metrics.json").read_text()).get("status")
            if (other / "metrics.json").exists()
            else None
        )
        files = resume_files(other)
        if status in FINISHED or not any(p.suffix in (".pt", ".prev") for p in files):
            continue
        if comparable_config(OmegaConf.to_container(OmegaConf.load(other / "config.yaml"))) != wanted:
            continue
        for f in files:
            shutil.copy2(f, run_dir / f.name)
        log.info("resuming the unfinished run %s", other)
        return
    log.warning(
        "resume=true but no unfinished run of '%s' with this config under %s: starting fresh",
        cfg.name,
        Path(cfg.output_root, cfg.name),
    )


# What a run runs (the package, its configs, the experiment scripts, the pinned dependencies): only
# an uncommitted change there makes a record `-dirty`; docs, tests and results do not.
CODE_PATHS = ("dpm", "conf", "experiments", "pyproject.toml")


def git_sha(source: Path = Path(__file__).resolve().parent) -> str | None:
    """The commit checked out in the git tree that holds `source` (dpm's own package by default), with
    `-dirty` when CODE_PATHS hold uncommitted changes there. Records use CODE_SHA, this taken when the
    process imported the code."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "--", *(f":(top){p}" for p in CODE_PATHS)],
                cwd=source,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return sha.stdout.strip() + ("-dirty" if dirty else "")
    return None


# The commit of the code this process loaded, taken once at import: a sweep runs its jobs one after
# another on the modules it imported at its start, so a commit that lands meanwhile must not be
# credited with the later jobs' results (it was, when each run asked git at its own start).
CODE_SHA = git_sha()
