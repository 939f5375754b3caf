"""DepGraph's stage (or no pruner): optional sparse learning, then the selection rounds with the
DPM decay inside the fine-tune phase (docs/method.md section 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dpm import distributed
from dpm.checkpoint import StageCache, atomic_write_json
from dpm.errors import UserError
from dpm.measure import max_speedup_bound
from dpm.pruners import DepGraphPruner
from dpm.pruners.rounds import PruningRounds
from dpm.stages.base import CHECKPOINT, Fail, RunContext, decay_log, decay_steps, rectify_config
from dpm.stages.baseline import cached_phase, pretrain_key_fields


def run_stage(ctx: RunContext) -> dict:
    """DepGraph (or no pruner): optional sparse learning, then selection rounds with DPM inside the
    fine-tune phase (docs/method.md section 6)."""
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
        out.update(
            R=cfg.pruner.rounds,
            N=rounds.controller.N,
            round_interval=rounds.interval,
            speedup_target=cfg.pruner.speedup,
            sparse_learning=tcfg.sparse.epochs > 0,
        )
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
    p = cfg.pruner
    return DepGraphPruner(
        model,
        example,
        num_classes=cfg.dataset.num_classes,
        iterative_steps=p.iterative_steps,
        global_pruning=p.global_pruning,
        max_pruning_ratio=p.max_pruning_ratio,
        reg=p.reg,
        sparse_learning=cfg.trainer.sparse.epochs > 0,
    )


def preflight(ctx: RunContext) -> None:
    """Checks that need the model and data but no training: the speed-up is reachable and the rounds
    and their decay fit into the fine-tune phase."""
    p = ctx.cfg.pruner
    if p.name == "none":
        return
    bound = max_speedup_bound(ctx.model, ctx.example, p.max_pruning_ratio)
    if p.speedup > bound:
        raise UserError(
            f"pruner.speedup={p.speedup}: {ctx.cfg.model.name} cannot get faster than about {bound:.2f}x "
            f"by pruning channels (max_pruning_ratio={p.max_pruning_ratio}): lower the target"
        )
    rounds_plan(ctx.cfg, len(ctx.phase_loader("finetune")))


def rounds_plan(cfg: DictConfig, iters_per_epoch: int) -> tuple[int, int]:
    """(N, round interval) in iterations for DepGraph's rounds; a UserError when they do not fit."""
    d, p = cfg.dpm, cfg.pruner
    iters_total = iters_per_epoch * cfg.trainer.finetune.epochs
    interval = p.round_interval or iters_per_epoch
    N = decay_steps(cfg, iters_per_epoch, iters_left=iters_total)
    if p.rounds > 1 and N * d.interval >= interval:
        raise UserError(
            f"dpm.N={N} (x interval {d.interval}) does not fit between rounds {interval} iterations "
            f"apart: raise pruner.round_interval or lower dpm.N"
        )
    if (p.rounds - 1) * interval + N * d.interval > iters_total:
        raise UserError(
            f"pruner.rounds={p.rounds} every {interval} iterations with N={N} needs more than the "
            f"{iters_total} fine-tune iterations: raise trainer.finetune.epochs or lower the rounds"
        )
    return N, interval


def make_rounds(cfg: DictConfig, model: torch.nn.Module, pruner, iters_per_epoch: int):
    """The fine-tune hook that runs the selection rounds with the DPM decay (docs/method.md section 6)."""
    d, p = cfg.dpm, cfg.pruner
    N, interval = rounds_plan(cfg, iters_per_epoch)
    return PruningRounds(
        model,
        pruner,
        speedup=p.speedup,
        rounds=p.rounds,
        interval=interval,
        N=N,
        decay_interval=d.interval,
        schedule=d.schedule,
        include_consumers=d.include_consumers,
        rectify=rectify_config(d),
        max_extra_rounds=p.max_extra_rounds,
        total_steps=iters_per_epoch * cfg.trainer.finetune.epochs,
        track=d.track,
    )


class Regularizer:
    """Sparse-learning hook: the base pruner's regulariser on the gradients before each step."""

    def __init__(self, model: torch.nn.Module, pruner):
        self.model, self.pruner = model, pruner

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.pruner.regularize(self.model)


def sparse_learning(cfg: DictConfig, model: torch.nn.Module, pruner, run_dir: Path, run_phase) -> dict:
    """Stage 1b: the base pruner's sparse learning (DepGraph group_sl) before pruning."""
    hooks = [Regularizer(model, pruner)]
    if not cfg.pretrain.cache:
        summary = run_phase("sparse", run_dir / "sparse_last.pt", hooks)
        return {"sparse_source": "trained", "sparse_top1": summary.get("test_top1_final")}
    key = {
        "pretrain": pretrain_key_fields(cfg),
        "pretrain_checkpoint": cfg.pretrain.checkpoint,
        "sparse": OmegaConf.to_container(cfg.trainer.sparse, resolve=True),
        "pruner": cfg.pruner.name,
        "reg": cfg.pruner.reg,
    }
    cache = StageCache(cfg.cache_dir, key)
    source, summary = cached_phase(cache, "sparse", model, lambda path: run_phase("sparse", path, hooks))
    return {"sparse_source": source, "sparse_key": cache.key, "sparse_top1": summary.get("test_top1_final")}


def validate_config(cfg: DictConfig, fail: Fail) -> None:
    """DepGraph's own keys (dpm.config.validate calls this for pruner=depgraph)."""
    p = cfg.pruner
    if p.name != "depgraph":
        return
    if p.rounds < 1:
        fail("pruner.rounds", p.rounds, "must be >= 1")
    if p.round_interval < 0:
        fail("pruner.round_interval", p.round_interval, "must be >= 0 (0 = one fine-tune epoch)")
    if cfg.trainer.finetune.epochs < 1:
        fail("trainer.finetune.epochs", cfg.trainer.finetune.epochs, "pruning happens during fine-tuning: use >= 1")
    if not 0 < p.max_pruning_ratio <= 1:
        fail("pruner.max_pruning_ratio", p.max_pruning_ratio, "must be in (0, 1]")
