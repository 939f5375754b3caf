"""The named pieces of one training phase (dpm.train.train_phase puts them together):

* :class:`PhaseState`: what a phase carries across epochs and checkpoints (optimizer, scheduler,
  history, skipped steps) and where it starts, fresh or resumed from its checkpoint;
* :class:`CheckpointPolicy`: where and when the phase checkpoints (after every epoch, optionally
  inside one) and what a checkpoint holds;
* :class:`EpochMeter`: an epoch's running loss / accuracy sums, carried through a mid-epoch
  checkpoint and summed over ranks at the epoch's end;
* :class:`NanPolicy`: what a non-finite loss does (`fail`: stop naming the step, read from the
  device every NAN_CHECK_EVERY steps; `skip_step`: skip the step, one host sync each).

Each keeps the order of the tensor operations the single loop had, so runs stay bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist
import torch.nn as nn

from dpm import distributed
from dpm.checkpoint import atomic_torch_save, checkpoint_exists, load_checkpoint, rng_state, set_rng_state
from dpm.errors import UserError
from dpm.models import is_channels_last

log = logging.getLogger("dpm.train")

# Steps between reads of the on-device non-finite flag (one host sync each).
NAN_CHECK_EVERY = 50
# Steps between reads of the clock for trainer.checkpoint_every_minutes (a collective under DDP).
CHECKPOINT_POLL = 20


class NumericalError(UserError):
    """A NaN/inf loss or parameter: the run stops, its last good checkpoint stays the latest."""


@dataclass
class PhaseState:
    """A phase's optimizer, scheduler and history, and where it starts: epoch `start_epoch`, step
    `start_step` of it (> 0 after a mid-epoch checkpoint, whose running sums are `partial`)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    start_step: int = 0
    partial: dict | None = None
    skipped_steps: int = 0

    @classmethod
    def start(
        cls,
        model: nn.Module,
        phase: str,
        phase_cfg: Any,
        hooks: list,
        checkpoint_path: str | Path | None,
        bf16: bool,
        optimizer_factory: Callable[[nn.Module, Any], torch.optim.Optimizer],
        scheduler_factory: Callable[[torch.optim.Optimizer, Any], Any],
    ) -> "PhaseState":
        """A fresh phase, or the one `checkpoint_path` holds (hooks, model, optimizer, scheduler,
        history and RNG state restored)."""
        optimizer = optimizer_factory(model, phase_cfg)
        state = cls(optimizer, scheduler_factory(optimizer, phase_cfg))
        if checkpoint_path is None or not checkpoint_exists(checkpoint_path):
            return state
        saved = load_checkpoint(checkpoint_path)
        if saved.get("phase") != phase:
            return state
        refuse_other_numerics(saved, checkpoint_path, bf16, model)
        # Hooks first: a pruner replays its removals so the pruned weights fit the model; the
        # optimizer is then rebuilt over the (possibly smaller) parameters before its state loads.
        for hook, hook_state in zip(hooks, saved.get("hooks", [])):
            if hook_state is not None:
                hook.load_state_dict(hook_state)
        model.load_state_dict(saved["model"])
        state.optimizer = optimizer_factory(model, phase_cfg)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler = scheduler_factory(state.optimizer, phase_cfg)
        state.scheduler.load_state_dict(saved["scheduler"])
        state.history = saved["history"]
        state.start_epoch = saved["epoch"]
        state.skipped_steps = saved.get("skipped_steps", 0)
        state.start_step, state.partial = saved.get("step", 0), saved.get("partial")
        set_rng_state(saved["rng"])
        if state.start_step:
            log.info(
                "%s: resuming at step %d of epoch %d from %s",
                phase,
                state.start_step,
                state.start_epoch + 1,
                checkpoint_path,
            )
        else:
            log.info("%s: resuming after epoch %d from %s", phase, state.start_epoch, checkpoint_path)
        return state


@dataclass
class CheckpointPolicy:
    """Where a phase checkpoints (`path` None: nowhere) and whether also inside an epoch."""

    path: str | Path | None
    every_steps: int = 0
    every_minutes: float = 0.0
    last_save: float = field(default_factory=time.time)

    @property
    def mid_epoch(self) -> bool:
        return self.path is not None and (self.every_steps > 0 or self.every_minutes > 0)

    def due_inside(self, steps_done: int, steps_per_epoch: int | None) -> bool:
        """A mid-epoch checkpoint after `steps_done` steps (never after an epoch's last step: the
        end-of-epoch checkpoint follows)."""
        return (
            self.mid_epoch
            and (steps_per_epoch is None or steps_done < steps_per_epoch)
            and checkpoint_due(steps_done, self.last_save, self.every_steps, self.every_minutes)
        )

    def save(
        self,
        phase: str,
        model: nn.Module,
        hooks: list,
        state: PhaseState,
        bf16: bool,
        epoch_done: int,
        step_done: int = 0,
        sums: dict | None = None,
    ) -> None:
        """The phase's checkpoint: after `epoch_done` epochs and `step_done` steps of the next one."""
        atomic_torch_save(
            {
                "phase": phase,
                "epoch": epoch_done,
                "step": step_done,
                "partial": sums,
                "model": model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in hooks],
                "history": state.history,
                "rng": rng_state(),
                "skipped_steps": state.skipped_steps,
                "numerics": numerics(bf16, model),
            },
            self.path,
        )

    def saved(self) -> None:
        """Restart the clock of `every_minutes` (after a checkpoint every rank waited for)."""
        self.last_save = time.time()


class EpochMeter:
    """An epoch's running sums on the device (no host sync a step) and its clock."""

    def __init__(self, device: torch.device, partial: dict | None = None) -> None:
        self.t0 = time.time()
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0
        if partial:  # this rank's running sums of the steps before a mid-epoch checkpoint
            mine = rank_partial(partial["ranks"])
            self.loss_sum += mine["loss_sum"]
            self.correct += mine["correct"]
            self.seen = mine["seen"]
            self.t0 -= partial["elapsed_s"]

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += loss.detach() * len(y)
        self.correct += (out.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def rank_sums(self) -> dict:
        """Each rank's sums for a mid-epoch checkpoint (summed over ranks only at the epoch's end)."""
        return distributed.gather_object(
            {"loss_sum": float(self.loss_sum), "correct": int(self.correct), "seen": self.seen}
        )

    def reduce(self, model: nn.Module, device: torch.device) -> None:
        """Under DDP, one collective an epoch: the ranks' sums, and rank 0's BatchNorm statistics
        everywhere (DDP broadcasts them before each forward; the last batch left each rank its own)."""
        if not distributed.is_initialized():
            return
        seen_t = torch.tensor(float(self.seen), device=device)
        distributed.all_reduce_sum(self.loss_sum, self.correct, seen_t)
        self.seen = int(seen_t.item())
        sync_buffers(model)

    def loss(self) -> float:
        return self.loss_sum.item() / max(self.seen, 1)

    def top1(self) -> float:
        return 100.0 * self.correct.item() / max(self.seen, 1)


class NanPolicy:
    """`fail`: a non-finite loss stops the phase naming its first step; the flag lives on the device
    and is read every NAN_CHECK_EVERY steps, before any checkpoint and at the epoch's end.
    `skip_step`: a step with a non-finite loss is skipped (one host sync a step, agreed by all ranks)."""

    def __init__(self, on_nan: str, phase: str, phase_cfg: Any, device: torch.device) -> None:
        if on_nan not in ("fail", "skip_step"):
            raise UserError(f"trainer.on_nan={on_nan!r}: valid: fail, skip_step")
        self.skip = on_nan == "skip_step"
        self.phase, self.phase_cfg, self.device = phase, phase_cfg, device
        self.first_nonfinite = self._none()

    def _none(self) -> torch.Tensor:
        return torch.full((), -1, dtype=torch.long, device=self.device)  # step index, -1 = none

    def start_epoch(self) -> None:
        self.first_nonfinite = self._none()

    def skip_step(self, loss: torch.Tensor, step: int, phase_step: int, epoch: int) -> bool:
        """Whether to skip this step (skip_step); under `fail` record the step and raise when due."""
        if self.skip:
            finite = torch.isfinite(loss.detach()).float()
            if distributed.is_initialized():  # every rank skips together, or DDP would hang
                tdist.all_reduce(finite, op=tdist.ReduceOp.MIN)
            if not bool(finite):  # the host sync this policy costs
                log.warning(
                    "%s step %d: loss %s, step skipped (trainer.on_nan=skip_step)", self.phase, phase_step, loss.item()
                )
                return True
            return False
        self.first_nonfinite = torch.where(
            (self.first_nonfinite < 0) & ~torch.isfinite(loss.detach()),
            torch.full_like(self.first_nonfinite, phase_step),
            self.first_nonfinite,
        )
        if step % NAN_CHECK_EVERY == NAN_CHECK_EVERY - 1:
            self.check(epoch)
        return False

    def check(self, epoch: int) -> None:
        """Raise NumericalError if any rank saw a non-finite loss (a collective and a host sync)."""
        distributed.all_reduce_max(self.first_nonfinite)
        step = int(self.first_nonfinite.item())
        if step >= 0:
            raise NumericalError(
                f"{self.phase}: the loss became NaN/inf at step {step} (epoch {epoch + 1}); the last good "
                f"checkpoint is kept: lower trainer.{self.phase}.lr (now {self.phase_cfg.lr}), check the data, "
                f"or set trainer.on_nan=skip_step"
            )

    def check_parameters(self, model: nn.Module, epoch: int) -> None:
        bad = nonfinite_parameters(model)
        if bad:
            raise NumericalError(
                f"{self.phase}: parameter {bad[0]} is not finite after epoch {epoch + 1}; the last good "
                f"checkpoint is kept: lower trainer.{self.phase}.lr (now {self.phase_cfg.lr}) or check the data"
            )


def numerics(bf16: bool, model: nn.Module) -> dict:
    """What decides a phase's arithmetic besides the config: bf16 autocast and the memory format."""
    return {"bf16": bool(bf16), "channels_last": is_channels_last(model)}


def refuse_other_numerics(state: dict, path: str | Path, bf16: bool, model: nn.Module) -> None:
    """A phase continues only with the arithmetic it started with: resuming an fp32 NCHW checkpoint
    on the fast path (or back) would mix two numerics in one run. A checkpoint written before this
    was recorded carries no `numerics` and is taken as it is."""
    saved, now = state.get("numerics"), numerics(bf16, model)
    if saved is None or saved == now:
        return
    raise UserError(
        f"{path} was trained with bf16={saved['bf16']}, channels_last={saved['channels_last']} but this "
        f"run resolves bf16={now['bf16']}, channels_last={now['channels_last']}: continue it with "
        f"trainer.bf16={str(saved['bf16']).lower()} trainer.channels_last="
        f"{str(saved['channels_last']).lower()}, or start it under another run_id"
    )


def rank_partial(ranks: list[dict]) -> dict:
    """This rank's share of the running sums saved with a mid-epoch checkpoint. Resumed with another
    number of ranks, rank 0 takes all of them (the epoch's totals are unchanged) and the others none."""
    if len(ranks) == distributed.world_size():
        return ranks[distributed.rank()]
    if not distributed.is_main():
        return {"loss_sum": 0.0, "correct": 0, "seen": 0}
    return {key: sum(r[key] for r in ranks) for key in ("loss_sum", "correct", "seen")}


def checkpoint_due(steps_done: int, last_save: float, every_steps: int, every_minutes: float) -> bool:
    """Whether a mid-epoch checkpoint is due after `steps_done` steps of the epoch. The clock is read
    every CHECKPOINT_POLL steps and, under DDP, rank 0's reading decides for every rank."""
    if every_steps > 0 and steps_done % every_steps == 0:
        return True
    if every_minutes <= 0 or steps_done % CHECKPOINT_POLL:
        return False
    return bool(distributed.broadcast_object(time.time() - last_save >= 60.0 * every_minutes))


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank."""
    for buf in model.buffers():
        tdist.broadcast(buf, 0)


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or inf (one host sync when all are finite)."""
    params = [(n, p) for n, p in model.named_parameters()]
    if not params or bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
        return []
    return [n for n, p in params if not bool(torch.isfinite(p).all())]
