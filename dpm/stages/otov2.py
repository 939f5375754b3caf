"""OTOv2's stage: DHSPG trains the model for ``pruner.train`` (from scratch in OTOv2's recipe:
``trainer.pretrain.epochs=0``), the zero groups are removed with Torch-Pruning (consumers
included), the pruned model is saved as weights plus structure, measured, and fine-tuned with
``trainer.finetune`` when its epochs are > 0 (0 in OTOv2's recipe, which trains once)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from dpm.checkpoint import atomic_write_json, save_pruned_model
from dpm.core import DecayController
from dpm.errors import UserError
from dpm.pruners.otov2 import DHSPG, VARIANT_DEFAULTS, WEIGHT_DECAY_TYPES, remove_zero_groups, zero_invariant_groups
from dpm.stages.base import CHECKPOINT, Fail, RunContext, decay_log, decay_steps, model_build_spec, rectify_config


class ControllerHook:
    """Training-loop hook that puts the decay controller into the phase checkpoint (DHSPG drives
    the controller from inside its own step) and exposes it for per-step logging.

    With ``evaluate`` it also records the test top-1 right before the step that starts pruning
    (``start_step`` DHSPG steps done): OTOv2 trains from scratch, so the accuracy before the stage
    is chance level and this is the meaningful "before pruning" number.
    """

    def __init__(
        self, controller: DecayController, evaluate: Callable[[], float] | None = None, start_step: int = 0
    ) -> None:
        self.controller = controller
        self.evaluate, self.start_step = evaluate, start_step
        self.top1_at_start: float | None = None

    def step_start(self, optimizer: torch.optim.Optimizer) -> None:
        if (
            self.evaluate is not None
            and self.top1_at_start is None
            and getattr(optimizer, "num_steps", None) == self.start_step
        ):
            self.top1_at_start = self.evaluate()

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "top1_at_start": self.top1_at_start}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.top1_at_start = state.get("top1_at_start")


def dhspg_kwargs(p: Any) -> dict[str, Any]:
    """DHSPG's keyword arguments from a ``pruner`` config node (steps resolved by the caller)."""
    keys = (
        "variant",
        "lmbda",
        "lmbda_amplify",
        "hat_lmbda_coeff",
        "epsilon",
        "weight_decay",
        "weight_decay_type",
        "first_momentum",
        "second_momentum",
        "dampening",
        "target_group_sparsity",
        "tolerance_group_sparsity",
        "partition_step",
        "half_space_project_steps",
        "warm_up_steps",
        "group_divisible",
        "fixed_zero_groups",
    )
    return {k: p[k] for k in keys}


def start_pruning_step(p: Any, iters_per_epoch: int) -> int:
    """``start_pruning_epochs`` (when set) in optimizer steps of the DHSPG phase, else ``start_pruning_steps``."""
    if p.start_pruning_epochs is not None:
        return int(round(p.start_pruning_epochs * iters_per_epoch))
    return int(p.start_pruning_steps)


def preflight(ctx: RunContext) -> None:
    """Before any training: pruning starts inside the DHSPG phase and the decay fits after it."""
    plan(ctx, len(ctx.phase_loader("dhspg", ctx.cfg.pruner.train.batch_size)))


def plan(ctx: RunContext, iters: int) -> tuple[int, int]:
    """(the step pruning starts at, N) for a DHSPG phase of ``iters`` steps an epoch; a UserError
    when they do not fit."""
    p = ctx.cfg.pruner
    start = start_pruning_step(p, iters)
    total = iters * p.train.epochs
    if start >= total:
        raise UserError(
            f"pruner.start_pruning_steps: pruning would start at step {start}, after the "
            f"{total} steps of pruner.train: lower it or raise pruner.train.epochs"
        )
    return start, decay_steps(ctx.cfg, iters, iters_left=total - start)


def run_stage(ctx: RunContext) -> dict:
    """OTOv2 with DPM (docs/method.md section 6): DHSPG training, physical removal, optional fine-tune.

    ``dpm=base`` runs the same path with N = 1 (the controller zeroes and masks at admission: the
    base method bit for bit), so the three variants differ only in the decay.
    """
    cfg, p, d = ctx.cfg, ctx.cfg.pruner, ctx.cfg.dpm
    model = ctx.model
    zigs, pruner = zero_invariant_groups(model, ctx.example, cfg.dataset.num_classes)
    ctx.mark_before_prune()
    loader = ctx.phase_loader("dhspg", p.train.batch_size)
    start, N = plan(ctx, len(loader))
    rectify = rectify_config(d)
    holder: dict[str, DHSPG] = {}
    controller = DecayController(
        model,
        N,
        interval=d.interval,
        schedule=d.schedule,
        rectify=rectify,
        include_consumers=d.include_consumers,
        replacement=lambda released, excluded: holder["opt"].replacement(released, excluded),
        track=d.track,
    )
    # Every group is a family member from the start (C_len compares with the whole ZIG).
    controller.register(t for z in zigs for t in z.targets)
    kwargs = dhspg_kwargs(p)
    in_zig = {id(q) for z in zigs for q in z.params}

    def make_optimizer(m: nn.Module, pcfg: Any) -> DHSPG:
        opt = DHSPG(
            zigs,
            [q for q in m.parameters() if id(q) not in in_zig],
            lr=pcfg.lr,
            start_pruning_steps=start,
            controller=controller,
            **kwargs,
        )
        holder["opt"] = opt
        return opt

    hook = ControllerHook(controller, lambda: ctx.evaluate("test")[0], start)
    summary = ctx.run_phase(
        "dhspg",
        ctx.run_dir / CHECKPOINT,
        hooks=[hook],
        phase_cfg=p.train,
        loader=loader,
        optimizer_factory=make_optimizer,
    )
    summary["phase"] = "dhspg"
    opt = holder["opt"]
    out: dict[str, Any] = {
        "N": N,
        "start_pruning_step": start,
        "top1_at_pruning_start": hook.top1_at_start,
        "target_group_sparsity": p.target_group_sparsity,
    }
    out.update(opt.summary())
    out["decaying_at_end"] = controller.counts()["decaying"]
    counts = controller.counts()
    out.update(
        admitted=counts["decaying"] + counts["pruned"] + counts["releases_total"], released=counts["releases_total"]
    )
    atomic_write_json(ctx.run_dir / "dpm_log.json", decay_log(controller))

    # Physical removal of the zero groups (consumers included), decided from the group vectors.
    removal = remove_zero_groups(model, pruner, opt, ctx.eval_loaders["test"])
    out.update(removal)
    out["target_met"] = out["group_sparsity"] >= p.target_group_sparsity
    out["native_speedup"] = pruner.base_native[0] / pruner.native_macs_params()[0]
    # Weights plus structure, not a pickled module: loading it (load_pruned_model) runs no code.
    save_pruned_model(ctx.run_dir / "pruned_model.pt", model, model_build_spec(cfg), removed=removal["removed_groups"])
    out["pruned_model"] = str(ctx.run_dir / "pruned_model.pt")
    out["stage_epochs"] = {"dhspg": p.train.epochs, "finetune": cfg.trainer.finetune.epochs}
    # metrics["history"] holds pretrain and finetune only (dpm.run): the DHSPG epochs go here.
    out["dhspg_history"] = summary["history"]
    out["final_phase"] = summary
    if cfg.trainer.finetune.epochs > 0:
        out["top1_after_dhspg"], _ = ctx.evaluate("test")
        ft = ctx.run_phase("finetune", ctx.run_dir / "finetune_last.pt")
        ft["phase"] = "finetune"
        out["final_phase"] = ft
    return out


def validate_config(cfg: DictConfig, fail: Fail) -> None:
    """Semantic checks of the ``pruner`` keys (dpm.config.validate calls this for pruner=otov2)."""
    p = cfg.pruner
    if p.variant not in VARIANT_DEFAULTS:
        fail("pruner.variant", p.variant, f"valid: {', '.join(VARIANT_DEFAULTS)}")
    if p.weight_decay_type not in WEIGHT_DECAY_TYPES:
        fail("pruner.weight_decay_type", p.weight_decay_type, f"valid: {', '.join(WEIGHT_DECAY_TYPES)}")
    if not 0 < p.target_group_sparsity < 1:
        fail("pruner.target_group_sparsity", p.target_group_sparsity, "must be in (0, 1)")
    if not p.tolerance_group_sparsity >= 0:
        fail("pruner.tolerance_group_sparsity", p.tolerance_group_sparsity, "must be >= 0")
    for key in ("lmbda", "lmbda_amplify", "hat_lmbda_coeff", "weight_decay", "dampening"):
        if p[key] is not None and not p[key] >= 0:
            fail(f"pruner.{key}", p[key], "must be >= 0 (or null for the variant default)")
    for key in ("first_momentum", "second_momentum"):
        if p[key] is not None and not 0 <= p[key] < 1:
            fail(f"pruner.{key}", p[key], "must be in [0, 1) (or null for the variant default)")
    if not 0 <= p.epsilon < 1:
        fail("pruner.epsilon", p.epsilon, "the half-space threshold must be in [0, 1)")
    if p.group_divisible < 1:
        fail("pruner.group_divisible", p.group_divisible, "must be >= 1")
    for key in ("start_pruning_steps", "warm_up_steps"):
        if p[key] < 0:
            fail(f"pruner.{key}", p[key], "must be >= 0")
    if p.start_pruning_epochs is not None and not p.start_pruning_epochs >= 0:
        fail("pruner.start_pruning_epochs", p.start_pruning_epochs, "must be >= 0 (or null to use start_pruning_steps)")
    for key in ("partition_step", "half_space_project_steps"):
        if p[key] is not None and p[key] < 0:
            fail(f"pruner.{key}", p[key], "must be >= 0 (or null)")
    t = p.train
    if t.epochs < 1:
        fail("pruner.train.epochs", t.epochs, "DHSPG prunes while it trains: use >= 1")
    if not t.lr > 0:
        fail("pruner.train.lr", t.lr, "must be > 0")
    if t.batch_size < 1:
        fail("pruner.train.batch_size", t.batch_size, "must be >= 1")
    if t.schedule not in ("cosine", "step", "constant"):
        fail("pruner.train.schedule", t.schedule, "valid: cosine, step, constant")
    if t.mixup < 0:
        fail("pruner.train.mixup", t.mixup, "the mixup alpha must be >= 0 (0 = off)")
    if list(t.milestones) != sorted(t.milestones):
        fail("pruner.train.milestones", list(t.milestones), "must be increasing")
    for key, set_by in (("momentum", "pruner.first_momentum"), ("weight_decay", "pruner.weight_decay")):
        if t[key] != 0:
            fail(f"pruner.train.{key}", t[key], f"DHSPG reads {set_by}: set pruner.train.{key}=0 and use {set_by}")
    if t.nesterov:
        fail("pruner.train.nesterov", t.nesterov, "DHSPG has no Nesterov momentum: set it to false")
