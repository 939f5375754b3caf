"""Gate Decorator's stage (docs/method.md section 6): gate the BNs, Tick-Tock until the FLOPs
target with the DPM decay inside the ticks, drain the decays in flight, melt (fold the gates, remove
the masked units) and fine-tune; every phase checkpointed and resumable."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dpm.checkpoint import atomic_write_json, checkpoint_exists, load_checkpoint
from dpm.errors import UserError
from dpm.measure import max_speedup_bound, thop_default_macs_params
from dpm.pruners.gate_decorator import DECAY_VECTORS, FLOOR_ROUNDINGS, TICK_RULES, GateDecorator
from dpm.pruners.gate_decorator_gates import fold_gates, gate_model
from dpm.pruners.gate_decorator_units import channel_units, remove_channels
from dpm.stages.base import CHECKPOINT, Fail, RunContext, decay_log, decay_steps, rectify_config

log = logging.getLogger(__name__)

#: The pruning loop's checkpoint (gates, ticks, tocks, drain) and the per-tick log.
LOOP_CHECKPOINT = "gate_decorator_last.pt"
TICK_LOG = "gate_decorator_ticks.json"


class _Steps:
    """A training loader cut to ``total`` steps over as many epochs as that takes (the drain)."""

    def __init__(self, loader: Any, total: int) -> None:
        self.loader, self.total = loader, total
        self.per_epoch = len(loader)
        self.epoch = self.start_step = 0

    @property
    def epochs(self) -> int:
        return max(1, math.ceil(self.total / self.per_epoch))

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch, and the step a resumed epoch starts from (the loader skips the steps before)."""
        self.epoch, self.start_step = epoch, start_step
        self.loader.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return max(0, min(self.per_epoch, self.total - self.epoch * self.per_epoch))

    def __iter__(self):
        n = len(self) - self.start_step
        for i, batch in enumerate(self.loader):
            if i >= n:
                break
            yield batch


class _MeltRecord:
    """The fine-tune phase's hook: the removed units and the stage summary, so a resumed fine-tune
    can rebuild the melted structure before its weights load."""

    def __init__(self, removed: list, summary: dict) -> None:
        self.removed, self.summary = removed, summary

    def state_dict(self) -> dict:
        return {"removed": [list(k) for k in self.removed], "summary": self.summary}

    def load_state_dict(self, state: dict) -> None:
        self.removed = [tuple(k) for k in state["removed"]]
        self.summary = state["summary"]


def _phase_cfg(base: Any, epochs: int) -> Any:
    out = copy.deepcopy(base)
    out.epochs = int(epochs)
    return out


def preflight(ctx: RunContext) -> None:
    """Before any training: the FLOPs target must be above what the per-layer floor allows (a bound
    from the conv / linear MACs with every layer at `min_channel_ratio`; couplings only raise it)."""
    p = ctx.cfg.pruner
    floor = 1.0 / max_speedup_bound(ctx.model, ctx.example, 1.0 - p.min_channel_ratio)
    if p.flops_target < floor:
        raise UserError(
            f"pruner.flops_target={p.flops_target}: with every layer kept at pruner.min_channel_ratio="
            f"{p.min_channel_ratio} at least about {floor:.3g} of {ctx.cfg.model.name}'s FLOPs remain: "
            f"raise flops_target or lower min_channel_ratio"
        )


def run_stage(ctx: RunContext) -> dict:
    """Gate Decorator with DPM between the pretrained baseline and the final measurement (see the
    module docstring); returns its metrics, ``final_phase`` and ``stage_epochs``."""
    cfg, p = ctx.cfg, ctx.cfg.pruner
    ctx.mark_before_prune()
    finetune_ckpt, loop_ckpt = ctx.run_dir / CHECKPOINT, ctx.run_dir / LOOP_CHECKPOINT
    tick_loader_len = len(ctx.phase_loader("finetune", p.tick.batch_size))
    N = decay_steps(cfg, tick_loader_len)
    out: dict[str, Any] = {}

    resumed_finetune = None
    if checkpoint_exists(finetune_ckpt):
        state = load_checkpoint(finetune_ckpt)
        if state.get("phase") == "finetune":
            resumed_finetune = state["hooks"][0]
    if resumed_finetune is not None:
        # Killed while fine-tuning: rebuild the melted structure; run_phase loads its weights.
        record = _MeltRecord([], {})
        record.load_state_dict(resumed_finetune)
        remove_channels(ctx.model, record.removed, ctx.example)
        log.info("gate_decorator: resuming the fine-tune of the melted model (%d units removed)", len(record.removed))
    else:
        record = _prune(ctx, N, loop_ckpt)
    out.update(record.summary)

    tcfg = cfg.trainer
    if tcfg.finetune.epochs > 0:
        for prm in ctx.model.parameters():
            prm.requires_grad_(True)
        out["final_phase"] = ctx.run_phase("finetune", finetune_ckpt, hooks=[record])
        out["final_phase"]["phase"] = "finetune"
    out["stage_epochs"] = {
        "tick": out.pop("tick_epochs"),
        "tock": out.pop("tock_epochs"),
        "drain": out.pop("drain_epochs"),
        "finetune": tcfg.finetune.epochs,
    }
    return out


def _prune(ctx: RunContext, N: int, loop_ckpt: Path) -> _MeltRecord:
    """Gate, Tick-Tock until the FLOPs target, drain, melt. Returns the melt record (removed units
    and the stage's metrics); ``ctx.model`` ends melted, in place."""
    cfg, p, d = ctx.cfg, ctx.cfg.pruner, ctx.cfg.dpm
    model = ctx.model
    units = channel_units(model, ctx.example, cfg.dataset.num_classes)
    skeleton = copy.deepcopy(model)
    gate_model(model)
    rectify = rectify_config(d)
    gd = GateDecorator(
        model,
        units,
        skeleton=skeleton,
        example=ctx.example,
        prune_ratio=p.prune_ratio,
        min_channel_ratio=p.min_channel_ratio,
        flops_target=p.flops_target,
        N=N,
        decay_interval=d.interval,
        schedule=d.schedule,
        rectify=rectify,
        decay_vector=p.decay_vector,
        tock_l1=p.tock_l1,
        tock_lr_max=p.tock_lr_max,
        track=d.track,
        tick_rule=p.tick_rule,
        floor_rounding=p.floor_rounding,
        tick_bn_bias=p.tick_bn_bias,
        carry_momentum=p.carry_momentum,
        trim_to_target=p.trim_to_target,
    )
    current: tuple[str, int] | None = ("tick", 1)
    if loop_ckpt.exists():
        state = load_checkpoint(loop_ckpt)
        gd.load_state_dict(state["hooks"][0])
        current = gd.current
        log.info("gate_decorator: resuming at %s %d", *current)

    while current is not None:
        kind, index = current
        phase = f"{kind}{index}"
        if kind == "tock":
            phase_cfg = p.tock
            loader = ctx.phase_loader(phase, phase_cfg.batch_size)
            steps = len(loader) * phase_cfg.epochs
        elif kind == "tick":
            phase_cfg = p.tick
            loader = ctx.phase_loader(phase, phase_cfg.batch_size)
            steps = len(loader) * phase_cfg.epochs
        else:  # drain (numbered on its own): tick-style steps until every decay has ended
            loader = _Steps(ctx.phase_loader(phase, p.tick.batch_size), gd.drain_total)
            phase_cfg = _phase_cfg(p.tick, loader.epochs)
            steps = gd.drain_total
        gd.begin_phase(kind, index, steps)
        # Ticks are many and short: no test pass after each unless asked.
        evaluated = ctx.eval_loaders if kind == "tock" or p.eval_ticks else {}
        ctx.run_phase(
            phase,
            loop_ckpt,
            hooks=[gd],
            phase_cfg=phase_cfg,
            loader=loader,
            eval_loaders=evaluated,
            optimizer_factory=gd.optimizer,
        )
        if kind == "drain":
            gd.drain_epochs += phase_cfg.epochs
        current = _next_phase(gd, kind, index, p)

    # Melt: fold the gates into BN, remove the masked units, check the function is unchanged.
    assert not gd.controller.decaying, "melt with decays in flight"
    removed = sorted(gd.controller.pruned)
    x = next(iter(ctx.eval_loaders["test"]))[0][:64]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(x)
    acc_before_melt, _ = ctx.evaluate("test")
    fold_gates(model)
    remove_channels(model, removed, ctx.example)
    model.eval()
    with torch.no_grad():
        melt_diff = (model(x) - before).abs().max().item()
    model.train(was_training)
    for prm in model.parameters():
        prm.requires_grad_(True)
    acc_after_melt, _ = ctx.evaluate("test")
    macs = thop_default_macs_params(model, ctx.example)[0]
    counts = gd.controller.counts()
    atomic_write_json(ctx.run_dir / "dpm_log.json", decay_log(gd.controller))
    atomic_write_json(ctx.run_dir / TICK_LOG, gd.tick_log)
    summary = {
        "N": N,
        "flops_target": p.flops_target,
        "prune_ratio": p.prune_ratio,
        "tock_every": p.tock_every,
        "decay_vector": p.decay_vector,
        "tick_rule": p.tick_rule,
        "floor_rounding": p.floor_rounding,
        "tick_bn_bias": p.tick_bn_bias,
        "carry_momentum": p.carry_momentum,
        "trim_to_target": p.trim_to_target,
        "tick_weight_decay": p.tick.weight_decay,
        "ticks": gd.ticks,
        "rounds_done": gd.ticks,
        "tocks": gd.tocks,
        "drain_steps": gd.drain_steps,
        "channels_total": len(units),
        "admitted": gd.admitted,
        "released": counts["releases_total"],
        "readmitted": counts["readmissions"],
        "pruned": len(removed),
        "native_flops_remaining": macs / gd.base_macs,
        "native_speedup": gd.base_macs / macs,
        "target_met": macs / gd.base_macs <= p.flops_target * (1 + 1e-9),
        "stop_reason": gd.stop_reason,
        "top1_before_melt": acc_before_melt,
        "top1_after_melt": acc_after_melt,
        "melt_max_abs_diff": melt_diff,
        "tick_epochs": gd.ticks * p.tick.epochs,
        "tock_epochs": gd.tocks * p.tock.epochs,
        "drain_epochs": gd.drain_epochs,
    }
    log.info(
        "gate_decorator: melted %d of %d units after %d ticks / %d tocks: native FLOPs left %.4f "
        "(target %.4f), output change %.2e",
        len(removed),
        len(units),
        gd.ticks,
        gd.tocks,
        summary["native_flops_remaining"],
        p.flops_target,
        melt_diff,
    )
    return _MeltRecord(removed, summary)


def _next_phase(gd: GateDecorator, kind: str, index: int, p: Any) -> tuple[str, int] | None:
    """After a phase: the tick's selection and the stopping rule; the next phase, or None to melt."""
    if kind == "tock":
        gd.tocks = index
        return "tick", index * p.tock_every + 1
    if kind == "drain":
        gd.drains = index
        if gd.controller.decaying:  # budget=strict admitted replacements for units released meanwhile
            if index >= p.max_ticks:
                raise UserError(
                    f"pruner.max_ticks={p.max_ticks}: still draining strict-budget replacements after "
                    f"{index} drains: raise dpm.T_rate / dpm.T_len or use dpm.budget=base"
                )
            gd.drain_total = gd.drain_length()
            return "drain", index + 1
        # SR may have released units during the drain: keep ticking until the pruned ones meet the target.
        if gd.target_met(gd.controller.pruned) or gd.stop_reason:
            return None
        return "tick", gd.ticks + 1
    gd.ticks = index
    record = gd.select()
    if not record["selected"] and record["flops_remaining"] > p.flops_target:
        gd.stop_reason = (
            f"no unit can be selected any more (every layer at pruner.min_channel_ratio="
            f"{p.min_channel_ratio}): raise flops_target or lower min_channel_ratio"
        )
    elif index >= p.max_ticks and record["flops_remaining"] > p.flops_target:
        gd.stop_reason = f"pruner.max_ticks={p.max_ticks} ticks reached: raise max_ticks or prune_ratio"
    if record["flops_remaining"] <= p.flops_target or gd.stop_reason:
        # Melt what was reached: short of the target, the run ends as target_missed and says why.
        if gd.stop_reason:
            log.warning(
                "gate_decorator: stopping short of the FLOPs target (%.4f left, target %.4f): %s",
                record["flops_remaining"],
                p.flops_target,
                gd.stop_reason,
            )
        gd.drain_total = gd.drain_length()
        return ("drain", gd.drains + 1) if gd.drain_total > 0 else None
    if index % p.tock_every == 0 and p.tock.epochs > 0:
        return "tock", index // p.tock_every
    return "tick", index + 1


def validate_config(cfg: DictConfig, fail: Fail) -> None:
    """Gate Decorator's own keys (called by dpm.config.validate)."""
    p = cfg.pruner
    if not 0 < p.flops_target < 1:
        fail("pruner.flops_target", p.flops_target, "the fraction of FLOPs left must be in (0, 1)")
    if not 0 < p.prune_ratio < 1:
        fail("pruner.prune_ratio", p.prune_ratio, "p, the fraction of remaining channels masked per tick, is in (0, 1)")
    if not 0 <= p.min_channel_ratio < 1:
        fail("pruner.min_channel_ratio", p.min_channel_ratio, "must be in [0, 1)")
    if p.tock_every < 1:
        fail("pruner.tock_every", p.tock_every, "T counts ticks between tocks and must be >= 1")
    if p.tick.epochs < 1:
        fail("pruner.tick.epochs", p.tick.epochs, "a tick collects scores over >= 1 epoch")
    if p.tock.epochs < 0:
        fail("pruner.tock.epochs", p.tock.epochs, "must be >= 0 (0 = no tocks)")
    for key in ("tick", "tock"):
        if not p[key].lr > 0:
            fail(f"pruner.{key}.lr", p[key].lr, "must be > 0")
        if p[key].batch_size < 1:
            fail(f"pruner.{key}.batch_size", p[key].batch_size, "must be >= 1")
    if not p.tock_lr_max >= p.tock.lr:
        fail("pruner.tock_lr_max", p.tock_lr_max, f"the triangular peak must be >= pruner.tock.lr ({p.tock.lr})")
    if not p.tock_l1 >= 0:
        fail("pruner.tock_l1", p.tock_l1, "must be >= 0")
    if p.decay_vector not in DECAY_VECTORS:
        fail("pruner.decay_vector", p.decay_vector, f"valid: {', '.join(DECAY_VECTORS)}")
    if p.tick_rule not in TICK_RULES:
        fail("pruner.tick_rule", p.tick_rule, f"valid: {', '.join(TICK_RULES)}")
    if p.floor_rounding not in FLOOR_ROUNDINGS:
        fail("pruner.floor_rounding", p.floor_rounding, f"valid: {', '.join(FLOOR_ROUNDINGS)}")
    if not p.tick.weight_decay >= 0:
        fail("pruner.tick.weight_decay", p.tick.weight_decay, "must be >= 0")
    if p.max_ticks < 1:
        fail("pruner.max_ticks", p.max_ticks, "must be >= 1")
    if cfg.dpm.include_consumers:
        fail("dpm.include_consumers", True, "gate_decorator decays gates (and producer rows) only: use false")
