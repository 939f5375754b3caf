"""Hydra entry point. One run = pretrain | load -> (prune, with DPM) -> fine-tune -> evaluate -> measure.

    python -m dpm                                   # the quickstart (digits, tiny CNN, CPU)
    python -m dpm experiment=cifar10_resnet20_cpu   # a real CIFAR-10 run

`run(cfg, run_dir)` does the work and is what tests call; `main` adds Hydra's CLI and output dirs.
Every run ends with `metrics.json` in its run dir, written atomically, `complete` or `failed`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpm.checkpoint import StageCache, atomic_write_bytes, atomic_write_json, load_checkpoint, seed_everything
from dpm.config import validate
from dpm.errors import UserError
from dpm.faults import fault_point

log = logging.getLogger("dpm")

CHECKPOINT = "checkpoint.pt"
# A run with one of these statuses is finished: run() returns its record instead of running it again.
FINISHED = ("complete", "target_missed")
# Run dirs of this process's multirun jobs that stopped with a UserError (sweep_verdict reads them).
SWEEP_FAILURES: list[str] = []
PRETRAIN_PROGRESS = "pretrain_last.pt"
# Keys that may change between a run and its resumption without changing its result.
RUNTIME_KEYS = ("run_id", "resume", "force_resume", "trainer.device", "trainer.progress", "trainer.num_workers",
                "trainer.eval_batch_size", "trainer.compile", "trainer.checkpoint_every_steps",
                "trainer.checkpoint_every_minutes", "logger", "output_root", "cache_dir", "dataset.root",
                "dpm.track")


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Execute one run described by a composed config and return its metrics (also in metrics.json).

    Raises UserError for bad input (after writing a `failed` metrics.json); the CLI turns it into
    one line on stderr.
    """
    from dpm import distributed

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
    from dpm import distributed
    from dpm.train import resolve_device

    t = cfg.trainer
    devices, nodes = OmegaConf.select(t, "devices", default=1), OmegaConf.select(t, "nodes", default=1)
    if devices * nodes <= 1 or distributed.is_initialized():
        return False
    distributed.setup(devices, nodes, resolve_device(t.device).type)
    return True


def _run_locked(cfg: DictConfig, run_dir: Path) -> dict:
    from dpm import distributed

    if not distributed.is_main():
        return _run_follower(cfg, run_dir)
    t0 = time.time()
    metrics: dict[str, Any] = identity_fields(cfg)
    metrics.update(run_dir=str(run_dir), git_sha=git_sha(), status="running")
    logger = None
    try:
        validate(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(resolved).encode())
        if cfg.resume:
            adopt_unfinished_run(cfg, run_dir)
        distributed.barrier()  # the other ranks read the checkpoints adopted here
        from dpm.loggers import make_logger

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
    from dpm import distributed
    from dpm.loggers import NullLogger

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
    reached = {"depgraph": lambda: f"{metrics['native_speedup']:.2f}x",
               "otov2": lambda: f"{metrics['group_sparsity']:.3f}",
               "gate_decorator": lambda: f"{100 * metrics['native_flops_remaining']:.1f}%"}.get(pruner)
    return f"{target_goal(metrics)}, reached {reached()}" if reached else f"target_met false ({pruner})"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold `run_dir/run.lock` (flock, with pid and host inside) for the run: a second process
    pointed at the same run dir is refused. A lock left by a dead process is not held by anyone
    (the kernel drops flocks with their process) and is taken over with a note."""
    import fcntl
    import os
    import socket

    path = run_dir / "run.lock"
    with open(path, "a+") as f:
        f.seek(0)
        holder = f.read().strip()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir} is in use by another process ({holder or 'unknown'}): wait for it to finish, "
                            f"or give this run another run_id / hydra.run.dir") from None
        if holder:
            log.info("taking over the stale lock of a process that is gone (%s)", holder)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
        raise UserError(f"{run_dir} holds a run with another config ({shown}): give this run another run_id, or "
                        f"force_resume=true to continue it with the new config")


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
    return {"name": get("name"), "table": get("table"), "ablation": get("ablation"), "model": get("model.name"),
            "dataset": get("dataset.name"), "pruner": get("pruner.name"), "variant": get("dpm.variant"),
            "seed": get("seed"), "N": get("dpm.N"), "T_rate": get("dpm.T_rate") if sr else None,
            "T_len": get("dpm.T_len") if sr else None}


@dataclass
class RunContext:
    """What a pruning stage gets from the runner (dpm.config.PRUNER_STAGES, `run_stage(ctx)`).

    `model` may be replaced by a stage (e.g. after a physical removal that builds a new module);
    `run_phase` always trains `ctx.model`. A stage calls `mark_before_prune()` once, at the point its
    base method would start pruning (after its own pre-pruning training, if any), and returns a dict
    with its metrics and `final_phase`: the summary of the last training phase it ran (or None).
    """

    cfg: DictConfig
    model: torch.nn.Module
    run_dir: Path
    device: torch.device
    example: torch.Tensor
    data: Any
    eval_loaders: dict
    log_metrics: Any
    metrics: dict = field(default_factory=dict)
    speed: Any = None  # dpm.train.Speed: bf16, channels_last, compile, eval batch for this device

    def phase_loader(self, phase: str, batch_size: int | None = None):
        """The training loader of a phase; its order and augmentation depend on (seed, phase, epoch) only."""
        from dpm import data as dpm_data

        t = self.cfg.trainer
        return dpm_data.train_loader(self.data, batch_size or t[phase].batch_size, self.device, self.cfg.seed, phase,
                                     t.max_steps_per_epoch, self._speed().channels_last, t.num_workers)

    def _speed(self):
        from dpm.train import resolve_speed

        if self.speed is None:
            self.speed = resolve_speed(self.cfg.trainer, self.device)
        return self.speed

    def run_phase(self, phase: str, checkpoint_path: Path | None, hooks=(), phase_cfg=None, loader=None,
                  eval_loaders: dict | None = None, **train_kwargs) -> dict:
        """Train `ctx.model` for one phase (`trainer.<phase>` unless `phase_cfg` is given), checkpointed and
        resumable at `checkpoint_path` (evaluated on `eval_loaders`, default all of `ctx.eval_loaders`);
        extra keyword arguments go to `dpm.train.train_phase`."""
        from dpm.train import train_phase

        t = self.cfg.trainer
        phase_cfg = phase_cfg if phase_cfg is not None else t[phase]
        loader = loader if loader is not None else self.phase_loader(phase, phase_cfg.batch_size)
        eval_loaders = self.eval_loaders if eval_loaders is None else eval_loaders
        return train_phase(self.model, phase, phase_cfg, loader, eval_loaders, self.device,
                           checkpoint_path=checkpoint_path, hooks=hooks, progress=t.progress,
                           bf16=self._speed().bf16, log_metrics=self.log_metrics, on_nan=t.on_nan,
                           compile=self._speed().compile, checkpoint_every_steps=t.checkpoint_every_steps,
                           checkpoint_every_minutes=t.checkpoint_every_minutes, **train_kwargs)

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        from dpm.train import evaluate

        return evaluate(self.model, self.eval_loaders[split], self.device, self._speed().bf16)

    def mark_before_prune(self) -> None:
        """Record the unpruned model's accuracy and counts (the base of every ratio in metrics.json)."""
        from dpm.measure import count_macs_params, native_macs_params

        self.metrics["top1_before_prune"], _ = self.evaluate("test")
        self.metrics["_base_counts"] = count_macs_params(self.model, self.example)
        self.metrics["_native_base"] = native_macs_params(self.model, self.example, self.cfg.pruner.name)


def execute(cfg: DictConfig, run_dir: Path, log_metrics) -> dict:
    """The stages of a run; returns the metrics they produce."""
    import importlib

    from dpm import data as dpm_data
    from dpm.config import PRUNER_STAGES
    from dpm.measure import compare_models, count_macs_params, native_macs_params
    from dpm import distributed
    from dpm.train import recalibrate_bn, resolve_device, resolve_speed

    tcfg = cfg.trainer
    device = distributed.device_for(resolve_device(tcfg.device))
    speed = resolve_speed(tcfg, device)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)
    data = dpm_data.build_data(cfg.dataset, cache_dir=cfg.cache_dir)
    model = build_configured_model(cfg).to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    eval_loaders = {"test": dpm_data.eval_loader(data, "test", speed.eval_batch_size, device, speed.channels_last,
                                                 tcfg.num_workers)}
    if data.val is not None:
        eval_loaders["val"] = dpm_data.eval_loader(data, "val", speed.eval_batch_size, device, speed.channels_last,
                                                   tcfg.num_workers)
    ctx = RunContext(cfg, model, run_dir, device, torch.zeros(data.example_shape, device=device), data,
                     eval_loaders, log_metrics, speed=speed)
    metrics = ctx.metrics
    metrics.update({"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                    # Results are bitwise reproducible at the same thread count only: record it.
                    "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                    "world_size": distributed.world_size(), "fast": speed.fast, "bf16": speed.bf16,
                    "channels_last": speed.channels_last, "compile": speed.compile, "fast_basis": speed.basis,
                    "train_size": len(data.train) if hasattr(data.train, "__len__") else None,
                    "val_size": len(data.val) if data.val is not None else 0})
    # An infeasible plan fails now, not after hours of pretraining: each stage may check its own.
    stage_module = importlib.import_module(PRUNER_STAGES[cfg.pruner.name]) if cfg.pruner.name in PRUNER_STAGES \
        else None
    if cfg.pruner.name == "depgraph":
        preflight_depgraph(ctx)
    elif hasattr(stage_module, "preflight"):
        stage_module.preflight(ctx)
    # Stage 1: the pretrained baseline (a given checkpoint, the shared cache, or trained here).
    metrics.update(pretrained_baseline(cfg, model, run_dir, ctx.run_phase))
    pretrain_summary = metrics.pop("pretrain_summary")

    # Stages 2 and 3: the base pruner with DPM, and fine-tuning.
    result = (stage_module.run_stage if stage_module is not None else depgraph_stage)(ctx)
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
    counter, native_macs, native_params = native_macs_params(model, example, cfg.pruner.name)
    metrics.update(native_counter=counter, native_base_macs=native_base[1], native_base_params=native_base[2],
                   native_pruned_macs=native_macs, native_pruned_params=native_params)
    epochs = {"pretrain": metrics.pop("pretrain_epochs")}
    epochs.update(metrics.pop("stage_epochs", {}))
    metrics["epochs"] = epochs
    skipped = pretrain_summary.get("skipped_steps", 0) + (final_phase.get("skipped_steps", 0)
                                                          if final_phase is not pretrain_summary else 0)
    if cfg.trainer.on_nan == "skip_step":
        metrics["nonfinite_steps_skipped"] = skipped
    metrics["history"] = {"pretrain": pretrain_summary["history"],
                          "finetune": final_phase["history"] if final_phase.get("phase") == "finetune" else []}
    return metrics


def depgraph_stage(ctx: RunContext) -> dict:
    """DepGraph (or no pruner): optional sparse learning, then selection rounds with DPM inside the
    fine-tune phase (docs/method.md section 6)."""
    from dpm import distributed

    cfg, tcfg = ctx.cfg, ctx.cfg.trainer
    out: dict[str, Any] = {}
    pruner = build_pruner(cfg, ctx.model, ctx.example)
    if pruner is not None and tcfg.sparse.epochs > 0:
        # Sparse learning, shared by base / +SP / +SR of a seed like the pretrain.
        out.update(sparse_learning(cfg, ctx.model, pruner, ctx.run_dir, ctx.run_phase))
    ctx.mark_before_prune()
    rounds = None
    if pruner is not None:
        rounds = make_rounds(cfg, ctx.model, pruner, len(ctx.phase_loader("finetune")))
        out.update(R=cfg.pruner.rounds, N=rounds.controller.N, round_interval=rounds.interval,
                   speedup_target=cfg.pruner.speedup, sparse_learning=tcfg.sparse.epochs > 0)
    if tcfg.finetune.epochs > 0:
        out["final_phase"] = ctx.run_phase("finetune", ctx.run_dir / CHECKPOINT, hooks=[rounds] if rounds else ())
        out["final_phase"]["phase"] = "finetune"
    if rounds is not None:
        out.update(rounds.summary())
        out["target_met"] = out["native_speedup"] >= cfg.pruner.speedup * (1 - 1e-9)
        dpm_log = decay_log(rounds.controller)
        if distributed.is_main():
            atomic_write_json(ctx.run_dir / "dpm_log.json", dpm_log)
    out["stage_epochs"] = {"sparse": tcfg.sparse.epochs if pruner else 0, "finetune": tcfg.finetune.epochs}
    return out


def build_pruner(cfg: DictConfig, model: torch.nn.Module, example: torch.Tensor):
    """The base pruner named by `pruner.name`, attached to the model (None for `none`)."""
    if cfg.pruner.name == "none":
        return None
    from dpm.pruners import DepGraphPruner

    p = cfg.pruner
    return DepGraphPruner(model, example, num_classes=cfg.dataset.num_classes, iterative_steps=p.iterative_steps,
                          global_pruning=p.global_pruning, max_pruning_ratio=p.max_pruning_ratio, reg=p.reg,
                          sparse_learning=cfg.trainer.sparse.epochs > 0)


def preflight_depgraph(ctx: RunContext) -> None:
    """Checks that need the model and data but no training: the speed-up is reachable and the rounds
    and their decay fit into the fine-tune phase."""
    from dpm.measure import max_speedup_bound

    p = ctx.cfg.pruner
    bound = max_speedup_bound(ctx.model, ctx.example, p.max_pruning_ratio)
    if p.speedup > bound:
        raise UserError(f"pruner.speedup={p.speedup}: {ctx.cfg.model.name} cannot get faster than about {bound:.2f}x "
                        f"by pruning channels (max_pruning_ratio={p.max_pruning_ratio}): lower the target")
    rounds_plan(ctx.cfg, len(ctx.phase_loader("finetune")))


def rounds_plan(cfg: DictConfig, iters_per_epoch: int) -> tuple[int, int]:
    """(N, round interval) in iterations for DepGraph's rounds; a UserError when they do not fit."""
    from dpm.core import resolve_decay_steps

    d, p = cfg.dpm, cfg.pruner
    iters_total = iters_per_epoch * cfg.trainer.finetune.epochs
    interval = p.round_interval or iters_per_epoch
    try:
        N = 1 if d.variant == "base" else resolve_decay_steps(
            N=d.N, N_epochs=None if d.N is not None else d.N_epochs, iters_per_epoch=iters_per_epoch,
            iters_left=iters_total)
    except ValueError as err:
        raise UserError(f"dpm.N: {err}") from None
    if p.rounds > 1 and N * d.interval >= interval:
        raise UserError(f"dpm.N={N} (x interval {d.interval}) does not fit between rounds {interval} iterations "
                        f"apart: raise pruner.round_interval or lower dpm.N")
    if (p.rounds - 1) * interval + N * d.interval > iters_total:
        raise UserError(f"pruner.rounds={p.rounds} every {interval} iterations with N={N} needs more than the "
                        f"{iters_total} fine-tune iterations: raise trainer.finetune.epochs or lower the rounds")
    return N, interval


def make_rounds(cfg: DictConfig, model: torch.nn.Module, pruner, iters_per_epoch: int):
    """The fine-tune hook that runs the selection rounds with the DPM decay (docs/method.md section 6)."""
    from dpm.pruners.rounds import PruningRounds

    d, p = cfg.dpm, cfg.pruner
    N, interval = rounds_plan(cfg, iters_per_epoch)
    return PruningRounds(model, pruner, speedup=p.speedup, rounds=p.rounds, interval=interval, N=N,
                         decay_interval=d.interval, schedule=d.schedule, include_consumers=d.include_consumers,
                         rectify=rectify_config(d), max_extra_rounds=p.max_extra_rounds,
                         total_steps=iters_per_epoch * cfg.trainer.finetune.epochs, track=d.track)


def rectify_config(d: DictConfig):
    """The Self-Rectifying settings of a `dpm` config node: a RectifyConfig for +SR, None otherwise."""
    from dpm.core import RectifyConfig

    if d.variant != "sr":
        return None
    return RectifyConfig(t_rate=d.T_rate, t_len=d.T_len, c_rate_form=d.c_rate_form, release_rule=d.release_rule,
                         release_cooldown=d.release_cooldown, budget=d.budget)


def decay_log(controller) -> dict:
    """The controller's per-step log (counts, C_rate/C_len summaries, norm trajectories, releases)."""
    state = controller.log.state_dict()
    return json.loads(json.dumps(state, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


class Regularizer:
    """Sparse-learning hook: the base pruner's regulariser on the gradients before each step."""

    def __init__(self, model: torch.nn.Module, pruner):
        self.model, self.pruner = model, pruner

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.pruner.regularize(self.model)


def model_build_spec(cfg: DictConfig) -> dict:
    """``dpm.models.build_model(**spec)`` builds the configured network (plain values: a pruned
    model's file stores it to rebuild the network, see dpm.checkpoint.save_pruned_model)."""
    options = {k: cfg.model[k] for k in ("shortcut", "classifier") if cfg.model[k] is not None}
    return {"name": str(cfg.model.name), "num_classes": int(cfg.dataset.num_classes),
            "in_channels": int(cfg.dataset.in_channels), **options}


def build_configured_model(cfg: DictConfig) -> torch.nn.Module:
    from dpm.models import build_model

    try:
        model = build_model(**model_build_spec(cfg))
    except ValueError as err:
        raise UserError(f"model: {err}") from None
    if cfg.model.weights:
        load_weights(model, cfg.model.weights, "model.weights")
    return model


def load_weights(model: torch.nn.Module, path: str, key: str) -> None:
    """Load a state_dict (or a dpm checkpoint holding one under "model") and insist that it fits."""
    if not Path(path).is_file():
        raise UserError(f"{key}={path} does not exist: give the path of a saved state_dict")
    state = load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        model.load_state_dict(state)
    except (RuntimeError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}={path} does not match the model ({first}): pick the checkpoint of this "
                        f"model and dataset") from None


def pretrain_key_fields(cfg: DictConfig) -> dict:
    """What determines a pretrained baseline: model, data, seed and the pretrain recipe (not where
    the files live or which device runs it)."""
    d = cfg.dataset
    return {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "dataset": {k: OmegaConf.to_container(d, resolve=True)[k] for k in
                        ("name", "num_classes", "in_channels", "image_size", "val_size", "train_subset",
                         "augment", "mean", "std", "synthetic_train", "synthetic_test", "bad_images")},
            "seed": cfg.seed,
            "recipe": OmegaConf.to_container(cfg.trainer.pretrain, resolve=True),
            "max_steps_per_epoch": cfg.trainer.max_steps_per_epoch, "bf16": resolved_bf16(cfg),
            "channels_last": resolved_channels_last(cfg)}  # fp32 NCHW and the fast path never share a baseline


def resolved_bf16(cfg: DictConfig) -> bool:
    """trainer.bf16 as the run resolves it (null follows trainer.fast and the device)."""
    from dpm.train import resolve_device, resolve_speed

    if cfg.trainer.bf16 is not None:
        return bool(cfg.trainer.bf16)
    return resolve_speed(cfg.trainer, resolve_device(cfg.trainer.device)).bf16


def resolved_channels_last(cfg: DictConfig) -> bool:
    """trainer.channels_last as the run resolves it (null follows trainer.fast and the device)."""
    from dpm.train import resolve_device, resolve_speed

    return resolve_speed(cfg.trainer, resolve_device(cfg.trainer.device)).channels_last


def pretrained_baseline(cfg: DictConfig, model: torch.nn.Module, run_dir: Path, run_phase) -> dict:
    """Stage 1. Returns metrics about where the weights came from, and the pretrain phase summary."""
    pcfg = cfg.pretrain
    if pcfg.checkpoint:
        load_weights(model, pcfg.checkpoint, "pretrain.checkpoint")
        log.info("pretrained weights from %s", pcfg.checkpoint)
        return {"pretrain_source": "checkpoint", "pretrain_checkpoint": pcfg.checkpoint,
                "pretrain_epochs": 0, "pretrain_summary": {"epochs": 0, "history": []}}
    if cfg.trainer.pretrain.epochs == 0:
        return {"pretrain_source": "scratch", "pretrain_epochs": 0,
                "pretrain_summary": {"epochs": 0, "history": []}}
    if not pcfg.cache:
        summary = run_phase("pretrain", run_dir / PRETRAIN_PROGRESS)
        return {"pretrain_source": "trained", "pretrain_epochs": summary["epochs"], "pretrain_summary": summary}
    cache = StageCache(cfg.cache_dir, pretrain_key_fields(cfg))
    source, summary = cached_phase(cache, "pretrain", model, lambda path: run_phase("pretrain", path))
    return {"pretrain_source": source, "pretrain_key": cache.key, "pretrain_checkpoint": str(cache.model_path),
            "pretrain_epochs": summary["epochs"], "pretrain_summary": summary,
            "pretrain_top1": summary.get("test_top1_final")}


def cached_phase(cache: StageCache, phase: str, model: torch.nn.Module, train) -> tuple[str, dict]:
    """Load the phase's result from the shared cache, or train it (under the key's lock) and publish it.
    Under DDP rank 0 holds the lock, decides, and alone publishes; the other ranks follow it."""
    from dpm import distributed

    main = distributed.is_main()
    with cache.lock() if main else contextlib.nullcontext():
        entry = cache.load() if main else None
        if distributed.broadcast_object(entry is not None) and entry is None:
            entry = cache.load()  # published by rank 0 under its lock
        if entry is not None:
            model.load_state_dict(entry["model"])
            log.info("reusing the cached %s result %s (%s)", phase, cache.key, cache.model_path)
            source, summary = "cache", entry["summary"]
        else:
            summary = train(cache.progress_path)
            if main:
                cache.publish({"model": model.state_dict(), "summary": summary, "key": cache.key_fields})
                log.info("%s result cached as %s", phase, cache.model_path)
            source = "trained"
    summary["phase"] = phase
    return source, summary


def sparse_learning(cfg: DictConfig, model: torch.nn.Module, pruner, run_dir: Path, run_phase) -> dict:
    """Stage 1b: the base pruner's sparse learning (DepGraph group_sl) before pruning."""
    hooks = [Regularizer(model, pruner)]
    if not cfg.pretrain.cache:
        summary = run_phase("sparse", run_dir / "sparse_last.pt", hooks)
        return {"sparse_source": "trained", "sparse_top1": summary.get("test_top1_final")}
    key = {"pretrain": pretrain_key_fields(cfg), "pretrain_checkpoint": cfg.pretrain.checkpoint,
           "sparse": OmegaConf.to_container(cfg.trainer.sparse, resolve=True), "pruner": cfg.pruner.name,
           "reg": cfg.pruner.reg}
    cache = StageCache(cfg.cache_dir, key)
    source, summary = cached_phase(cache, "sparse", model, lambda path: run_phase("sparse", path, hooks))
    return {"sparse_source": source, "sparse_key": cache.key, "sparse_top1": summary.get("test_top1_final")}


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
    candidates = sorted((p.parent for p in Path(cfg.output_root, cfg.name).glob("*/config.yaml")
                         if p.parent.resolve() != run_dir.resolve()),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for other in candidates:
        status = json.loads((other / "metrics.json").read_text()).get("status") if (other / "metrics.json").exists() else None
        files = resume_files(other)
        if status in FINISHED or not any(p.suffix in (".pt", ".prev") for p in files):
            continue
        if comparable_config(OmegaConf.to_container(OmegaConf.load(other / "config.yaml"))) != wanted:
            continue
        for f in files:
            shutil.copy2(f, run_dir / f.name)
        log.info("resuming the unfinished run %s", other)
        return
    log.warning("resume=true but no unfinished run of '%s' with this config under %s: starting fresh",
                cfg.name, Path(cfg.output_root, cfg.name))


def comparable_config(container: dict) -> dict:
    """The config without run-time keys: equal for a run and its resumption."""
    out = copy.deepcopy(container)
    for key in RUNTIME_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return out


def git_sha() -> str | None:
    """The commit of the code that ran (with `-dirty` when the tree had uncommitted changes)."""
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha.stdout.strip() + ("-dirty" if dirty else "")
    return None


def print_summary(metrics: dict) -> None:
    from dpm.report import format_runs

    source = {"trained": "pretrained here", "cache": "pretrained baseline reused from the cache",
              "checkpoint": "weights from pretrain.checkpoint", "scratch": "no pretraining"}
    print(f"\ndpm {metrics['name']}: {metrics['model']} on {metrics['dataset']} ({metrics.get('train_size')} "
          f"train images), {metrics.get('device')}, {source.get(metrics.get('pretrain_source'), '')}")
    print(format_runs([metrics]))
    if metrics.get("status") == "target_missed":
        print(f"\ntarget_missed: {metrics['error']}")
    print(f"\nmetrics: {Path(metrics['run_dir']) / 'metrics.json'}")


def _hydra_entry():
    import hydra

    import dpm.config  # noqa: F401  (registers the schema)

    from dpm.quickstart import CONF_DIR

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def hydra_main(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            metrics = run(cfg, run_dir)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            if sweep:
                # One line, no traceback: the sweep's other points still run, its report lists this
                # run as failed, and main() exits non-zero at the end.
                SWEEP_FAILURES.append(str(run_dir))
                return
            sys.exit(2)
        if not metrics.get("rank"):  # DDP: rank 0 reports
            print_summary(metrics)
        if metrics.get("status") == "target_missed" and not sweep:
            sys.exit(1)

    return hydra_main


def check_overrides(args: list[str]) -> None:
    """Compose the config the command line asks for (each value of a sweep once) and turn Hydra's
    multi-line composition errors into one line naming the key, the bad value and the fix.
    Hydra's own options (`-m`, `--cfg`, ...) and `hydra.*` overrides are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dpm.quickstart import compose

    plain, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"):
            return  # another primary config: Hydra reports its own errors
        if arg in ("--cfg", "-c", "--package", "-p", "--info", "-i", "--experimental-rerun"):
            i += 1 if arg in ("--info", "-i") and (i + 1 >= len(args) or "=" in args[i + 1]) else 2
            continue
        if not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            plain.append(arg)
        i += 1
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except HydraException as err:
        raise UserError(f"{str(err).strip().splitlines()[0]}: write overrides as key=value") from None
    first = [o.input_line if not o.is_sweep_override() else
             f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    trials = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            trials += [first[:i] + [f"{o.get_key_element()}={v}"] + first[i + 1:] for v in o.sweep_string_iterator()]
    for overrides in trials:
        try:
            compose(overrides)
        except (HydraException, OmegaConfBaseException) as err:
            raise UserError(composition_error_line(err)) from None
    # A sweep's run dirs are named after its overrides: many overrides exceed a file name's 255 bytes.
    from dpm.quickstart import CONF_DIR

    excluded = set(OmegaConf.load(CONF_DIR / "config.yaml").hydra.job.config.override_dirname.exclude_keys)
    named = [o for o in first if o.split("=", 1)[0].lstrip("+~") not in excluded]
    if any(a in ("-m", "--multirun") for a in args) and len(",".join(named)) > 230 and \
            not any(a.startswith("hydra.sweep.subdir=") for a in args):
        raise UserError(f"the sweep's run-dir names ({len(','.join(named))} characters of overrides) would exceed the "
                        f"file-name limit: add 'hydra.sweep.subdir=${{hydra.job.num}}' (numbered run dirs)")


def composition_error_line(err: Exception) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, the value, the fix."""
    cause = err.__cause__ or err
    text = str(err).strip()
    if "Could not find '" in text:  # an unknown option of a config group
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        options = [line.strip() for line in text.split("Available options in", 1)[-1].splitlines()[1:]
                   if line.startswith("\t") and "=" not in line and not line.strip().endswith("_schema")]
        group, _, name = missing.rpartition("/")
        return f"{group}={name}: no such {group} config; valid: {', '.join(options) or '(none)'}"
    key = getattr(cause, "full_key", None)
    message = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    if key and "could not be converted to" in message:
        kind = message.rsplit(" ", 1)[-1].lower()
        return f"{key}: {message}: give {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if key and " not in " in message:
        return f"{key}: no such key ({message}): check the spelling; `python -m dpm <overrides> --cfg job` prints every key"
    return f"{text.splitlines()[0]}: {message}" if message not in text else text.splitlines()[0]


def sweep_verdict() -> None:
    """After a multirun: exit 1 with one line when a run failed or ended short of its target (read
    from the sweep's report, which sees the runs of every launcher, and from this process's jobs)."""
    from dpm import callbacks

    report, callbacks.LAST_REPORT = callbacks.LAST_REPORT, None
    statuses = list(report.problems["status"]) if report is not None else []
    missed = statuses.count("target_missed")
    failed = max(len(statuses) - missed, len(SWEEP_FAILURES))
    SWEEP_FAILURES.clear()
    if missed or failed:
        total = len(report.runs) if report is not None else failed
        where = f": see {report.out / 'report.md'}" if report is not None else ""
        print(f"error: {missed + failed} of {total} runs did not complete ({missed} short of their pruning target, "
              f"{failed} failed or incomplete){where}", file=sys.stderr)
        sys.exit(1)
