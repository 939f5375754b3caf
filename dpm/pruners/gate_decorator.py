"""Gate Decorator (You et al., NeurIPS 2019) as a DPM base pruner (docs/method.md section 6).

The method, as dpm.stages.gate_decorator runs it after the pretrained baseline:

1. **Gate** every BatchNorm (:mod:`dpm.pruners.gate_decorator_gates`); find the channel units and
   their coupling with Torch-Pruning's dependency graph (:mod:`dpm.pruners.gate_decorator_units`).
2. **Tick-Tock.** A *tick* trains for ``pruner.tick.epochs`` (one epoch) with the convolutions
   frozen (gates, BN biases and Linear layers train) and sums the Taylor score ``|g * dL/dg|`` of
   every gate over its steps (a unit's score is the sum over its coupled BN channels). At its end
   the tick selects as the original code does (:meth:`GateDecorator.select`; README, "Gate Decorator"):
   ``num = int(p * left)`` BN-channel entries, ``left`` counted a tick late, every unit scored at or
   below the ``(num + 1)``-th lowest entry, each layer keeping its ``max(1, int(0.1 C))`` best; the
   selection goes to the decay controller. After every ``tock_every`` ticks a *tock* trains
   everything for ``pruner.tock.epochs`` with an L1 penalty on the gates and a triangular learning
   rate; one SGD momentum carries through ticks and tocks. Ticking stops once the native MACs left
   (thop default rules, decaying units counted as removed) are at most ``flops_target``.
3. **Melt**: decays still in flight finish first (a *drain* of tick-style steps); the gates are
   folded back into BN and the masked units removed physically; then fine-tuning (``trainer.finetune``).

DPM plugs into the tick's mask: ``dpm=base`` admits the selection with N = 1 (zeroed and masked at
once: Gate Decorator exactly), ``dpm=sp|sr`` decays the gate (or, with ``decay_vector=channel``,
conv filter + gate + BN bias) over N optimizer steps, across ticks and tocks, and sets the mask
once it is zero. Decaying units count as removed everywhere the method counts channels and are
never candidates; SR's released units sit out ``dpm.release_cooldown`` ticks (a round is one tick).
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from typing import Any, Hashable, Iterable

import torch
from torch import nn

from dpm.core import DecayController, RectifyConfig, Slice, Target
from dpm.errors import UserError
from dpm.pruners.gate_decorator_gates import GatedBatchNorm2d, gated_modules
from dpm.pruners.gate_decorator_units import ChannelUnit, macs_without

__all__ = ["GateDecorator", "set_trainable", "DECAY_VECTORS", "TICK_RULES", "FLOOR_ROUNDINGS"]

log = logging.getLogger(__name__)

DECAY_VECTORS = ("gate", "channel")
# original: the original code's count, lag and threshold (select()); units: dpm's earlier rule.
TICK_RULES = ("original", "units")
FLOOR_ROUNDINGS = ("floor", "ceil")
_STATE_VERSION = 2


class GateDecorator:
    """Tick-Tock with a DPM decay controller over the gated channels of ``model``; a training hook.

    Args:
        model: the gated model (see :func:`~dpm.pruners.gate_decorator_gates.gate_model`).
        units: its channel units (:func:`~dpm.pruners.gate_decorator_units.channel_units`, found on
            the model before gating).
        skeleton: a plain model of the unpruned structure, for the MACs the stopping rule reads.
        example: an input batch (its first sample is used for counting).
        prune_ratio: p, the fraction of what remains that a tick selects (see :meth:`select`).
        min_channel_ratio: the fraction of each group's units that always stays: its
            ``max(1, int(ratio * C))`` best-scored units (``floor_rounding="ceil"``: rounded up).
        flops_target: the native MACs fraction at which ticking stops.
        N, decay_interval, schedule, rectify: the decay (docs/method.md sections 3-4); N = 1 is the base.
        decay_vector: ``gate`` or ``channel`` (conv filter rows + gate + BN bias).
        tock_l1: L1 coefficient on the gates in tocks.
        tock_lr_max: the triangular learning rate's peak in tocks (its ends are the phase's lr).
        track: units whose norm trajectory the controller logs (None: all).
        tick_rule: ``original`` (the original code's count, lag and threshold) or ``units`` (dpm's
            earlier rule: the ``max(1, int(p x units left))`` lowest units, counted now).
        floor_rounding: ``floor`` (the original's ``int``) or ``ceil`` (dpm's earlier rounding).
        tick_bn_bias: BN biases train in ticks (the original) or stay frozen (dpm's earlier ticks).
        carry_momentum: one SGD momentum through every tick, tock and drain (the original's single
            optimizer), or a fresh optimizer per phase (dpm's earlier ticks).
        trim_to_target: the tick whose selection would cross ``flops_target`` keeps only the
            shortest lowest-scored prefix of it that reaches the target (False: the whole
            selection, the original, which can land up to a whole tick below the target).
    """

    def __init__(
        self,
        model: nn.Module,
        units: list[ChannelUnit],
        *,
        skeleton: nn.Module,
        example: torch.Tensor,
        prune_ratio: float,
        min_channel_ratio: float,
        flops_target: float,
        N: int = 1,
        decay_interval: int = 1,
        schedule: str = "linear",
        rectify: RectifyConfig | None = None,
        decay_vector: str = "gate",
        tock_l1: float = 0.0,
        tock_lr_max: float | None = None,
        track: int | None = 8,
        tick_rule: str = "original",
        floor_rounding: str = "floor",
        tick_bn_bias: bool = True,
        carry_momentum: bool = True,
        trim_to_target: bool = False,
    ) -> None:
        for name, value, valid in (
            ("decay_vector", decay_vector, DECAY_VECTORS),
            ("tick_rule", tick_rule, TICK_RULES),
            ("floor_rounding", floor_rounding, FLOOR_ROUNDINGS),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        self.model, self.units, self.skeleton = model, units, skeleton
        self.tick_rule, self.tick_bn_bias, self.carry_momentum = tick_rule, bool(tick_bn_bias), bool(carry_momentum)
        self.trim_to_target = bool(trim_to_target)
        self.example = example[:1]
        self.prune_ratio, self.flops_target = float(prune_ratio), float(flops_target)
        self.tock_l1, self.tock_lr_max = float(tock_l1), tock_lr_max
        self.gbns = gated_modules(model)
        missing = {bn for u in units for bn, _ in u.bns} - set(self.gbns)
        if missing:
            raise ValueError(f"units refer to BatchNorms that are not gated: {sorted(missing)}")
        self.row = {u.key: r for r, u in enumerate(units)}
        self.unit = {u.key: u for u in units}
        sizes = Counter(u.group for u in units)
        rounding = math.floor if floor_rounding == "floor" else math.ceil
        self.floor = {g: max(1, rounding(min_channel_ratio * n)) for g, n in sizes.items()}
        # A unit is one BN-channel entry per coupled BN: the original counts and cuts in entries.
        self.entries = {u.key: len(u.bns) for u in units}
        self.left_lagged: int | None = None  # the original's `left`, read a tick late (select())
        params = dict(model.named_parameters())
        self.targets = {u.key: self._target(u, decay_vector, params) for u in units}
        self.controller = DecayController(
            model,
            N,
            interval=decay_interval,
            schedule=schedule,
            rectify=rectify,
            replacement=self.replacement,
            track=track,
        )
        self.controller.register(self.targets.values())  # every unit: the C_len families
        # A unit's score is the sum of its BN channels' scores: gather them with one index_add.
        self.bn_names = list(self.gbns)
        offset, start = 0, {}
        for name in self.bn_names:
            start[name] = offset
            offset += self.gbns[name].num_features
        flat, rows = [], []
        for r, u in enumerate(units):
            for bn, c in u.bns:
                flat.append(start[bn] + c)
                rows.append(r)
        device = next(model.parameters()).device
        self._flat = torch.tensor(flat, dtype=torch.long, device=device)
        self._rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.base_macs = macs_without(skeleton, (), self.example)
        self.scores = {n: torch.zeros(m.num_features, dtype=torch.float64, device=device) for n, m in self.gbns.items()}
        self.last_scores: list[float] | None = None
        self.masked: set[Hashable] = set()
        # The Tick-Tock loop's position, checkpointed with the hook.
        self.mode = "tick"
        self.current: tuple[str, int] | None = None
        self.phase_step = 0
        self.phase_steps = 1
        self.drain_total = 0
        self.ticks = self.tocks = self.drains = self.drain_steps = self.drain_epochs = self.admitted = 0
        self.tick_log: list[dict] = []
        self.stop_reason: str | None = None  # why ticking stopped short of the target (None: it did not)
        # carry_momentum: momentum buffers by parameter name, handed from each phase's optimizer to the next.
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.carried: dict[str, torch.Tensor] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_phase: tuple[str, int] | None = None

    def _target(self, u: ChannelUnit, decay_vector: str, params: dict[str, nn.Parameter]) -> Target:
        slices = [Slice(self.gbns[bn].gate, 0, (c,)) for bn, c in u.bns]
        if decay_vector == "channel":
            slices += [Slice(params[name], dim, idx) for name, dim, idx in u.producers]
            slices += [Slice(self.gbns[bn].bias, 0, (c,)) for bn, c in u.bns]
        return Target(u.key, u.group, tuple(slices))

    # ------------------------------------------------------------------ phases
    def begin_phase(self, kind: str, index: int, steps: int) -> None:
        """Enter a tick, tock or drain: which parameters train, fresh scores, the phase's step count."""
        self.mode, self.current = kind, (kind, index)
        self.phase_step, self.phase_steps = 0, max(1, steps)
        for s in self.scores.values():
            s.zero_()
        set_trainable(self.model, kind, self.tick_bn_bias)

    def optimizer(self, model: nn.Module, phase_cfg: Any) -> torch.optim.Optimizer:
        """SGD over every parameter; the frozen ones sit in a group with lr 0 (never updated: they
        have no gradient) so the decay controller finds each decayed slice's learning rate.

        With ``carry_momentum`` the new phase's SGD starts from the momentum the previous phase's
        ended with (a frozen parameter's buffer waits, untouched, through the phases that freeze it),
        as the original's one optimizer does. A second call within one phase (train_phase rebuilds
        the optimizer before loading a checkpoint's state) starts from the same carried buffers.
        The carried buffers need no place in :meth:`state_dict`: each phase's optimizer holds all of
        them, so the optimizer state in the phase's checkpoint brings them back on resume."""
        live = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        groups = [{"params": live}]
        if frozen:
            groups.append({"params": frozen, "lr": 0.0, "weight_decay": 0.0, "frozen": True})
        opt = torch.optim.SGD(
            groups,
            lr=phase_cfg.lr,
            momentum=phase_cfg.momentum,
            nesterov=phase_cfg.nesterov and phase_cfg.momentum > 0,
            weight_decay=phase_cfg.weight_decay,
        )
        if self.carry_momentum:
            if self._optimizer is not None and self._optimizer_phase != self.current:
                self.carried = self._momentum(self._optimizer)
            for p in live + frozen:
                buf = self.carried.get(self.names[id(p)])
                if buf is not None:
                    opt.state[p]["momentum_buffer"] = buf.clone()
        self._optimizer, self._optimizer_phase = opt, self.current
        return opt

    def _momentum(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """The carried buffers, updated with every buffer ``optimizer`` holds."""
        carried = dict(self.carried)
        for group in optimizer.param_groups:
            for p in group["params"]:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    carried[self.names[id(p)]] = buf.detach().clone()
        return carried

    # ------------------------------------------------------------------ hook
    def step_start(self, optimizer: torch.optim.Optimizer) -> None:
        if self.mode == "tock" and self.tock_lr_max is not None:
            # Triangular, per step: the tock's lr at its first and last step, tock_lr_max half-way
            # (overrides the phase's per-epoch schedule).
            lo = optimizer.defaults["lr"]
            u = self.phase_step / max(1, self.phase_steps - 1)
            lr = lo + (self.tock_lr_max - lo) * (1.0 - abs(2.0 * u - 1.0))
            for g in optimizer.param_groups:
                if not g.get("frozen"):
                    g["lr"] = lr

    @torch.no_grad()
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.mode == "tick":
            # After backward: the (synchronised) loss gradient of each gate.
            for name, m in self.gbns.items():
                if m.gate.grad is not None:
                    self.scores[name].add_((m.gate.detach() * m.gate.grad).abs().to(torch.float64))
        # The controller reads the raw loss gradient (SR), so before the L1 term is added.
        self.controller.before_step(optimizer)
        if self.mode == "tock" and self.tock_l1 > 0:
            for m in self.gbns.values():
                if m.gate.grad is not None:
                    m.gate.grad.add_(torch.sign(m.gate.detach()), alpha=self.tock_l1)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.controller.after_step(optimizer)
        self.phase_step += 1
        if self.mode == "drain":
            self.drain_steps += 1
        self._sync_masks()

    @torch.no_grad()
    def _sync_masks(self) -> None:
        """Set the mask of every unit the controller has driven to zero (and only those)."""
        if self.controller.counts()["pruned"] == len(self.masked):  # O(1): the usual step
            return
        pruned = self.controller.pruned
        for key in pruned - self.masked:
            for bn, c in self.unit[key].bns:
                self.gbns[bn].mask[c] = 0.0
        self.masked = set(pruned)

    # ------------------------------------------------------------------ selection
    def removed(self) -> frozenset:
        """Units counted as removed: pruned and decaying."""
        return self.controller.pruned | self.controller.decaying

    def unit_scores(self) -> torch.Tensor:
        """Each unit's Taylor score accumulated over the current tick (sum over its BN channels)."""
        flat = torch.cat([self.scores[n] for n in self.bn_names])
        out = torch.zeros(len(self.units), dtype=torch.float64, device=flat.device)
        return out.index_add_(0, self._rows, flat.index_select(0, self._flat))

    def flops_remaining(self, removed: Iterable[Hashable] | None = None) -> float:
        """Native MACs left with ``removed`` (default: pruned + decaying units) gone, over the unpruned."""
        removed = self.removed() if removed is None else removed
        return macs_without(self.skeleton, sorted(removed), self.example) / self.base_macs

    def target_met(self, removed: Iterable[Hashable] | None = None) -> bool:
        """The stopping rule: native MACs left (``removed`` gone; default pruned + decaying) <= the target."""
        return self.flops_remaining(removed) <= self.flops_target

    def _choose(self, scores: list[float], count: int, excluded: frozenset) -> list[Hashable]:
        """The ``count`` lowest-scored units outside ``excluded`` whose group stays above its floor."""
        removed = self.removed()
        alive = Counter(u.group for u in self.units if u.key not in removed)
        order = sorted(range(len(self.units)), key=lambda r: (scores[r], r))
        chosen = []
        for r in order:
            if len(chosen) >= count:
                break
            u = self.units[r]
            if u.key in excluded or u.key in removed or alive[u.group] - 1 < self.floor[u.group]:
                continue
            alive[u.group] -= 1
            chosen.append(u.key)
        return chosen

    def _threshold_choose(
        self, scores: list[float], num: int, excluded: frozenset
    ) -> tuple[list[Hashable], float | None]:
        """The original's cut (rule 2 in the README's "Gate Decorator"): per group, the alive units but its
        ``floor`` best are candidates, each entered once per coupled BN; every candidate scored at
        or below the ``(num + 1)``-th lowest entry is chosen, ties included, unless it ties the
        group's floor (the original keeps every score >= its floor's lowest). Returns the chosen
        units, lowest first, and the threshold (None when there is no candidate)."""
        removed = self.removed()
        alive: dict[str, list[int]] = {}
        for r, u in enumerate(self.units):
            if u.key not in removed:
                alive.setdefault(u.group, []).append(r)
        candidates, entries = [], []
        for group, rows in alive.items():
            keep = self.floor[group]
            if len(rows) <= keep:
                continue
            ranked = sorted(rows, key=lambda r: (scores[r], r))
            hard = scores[ranked[-keep]]
            for r in ranked[:-keep]:
                if self.units[r].key not in excluded and scores[r] < hard:
                    candidates.append(r)
                if self.units[r].key not in excluded:
                    entries += [scores[r]] * self.entries[self.units[r].key]
        if not entries:
            return [], None
        # num past the last entry (the original raises IndexError there): every candidate goes.
        threshold = sorted(entries)[min(num, len(entries) - 1)]
        chosen = sorted((r for r in candidates if scores[r] <= threshold), key=lambda r: (scores[r], r))
        return [self.units[r].key for r in chosen], threshold

    def select(self) -> dict:
        """End of a tick: admit its selection to the controller; returns the tick's record.

        ``tick_rule="original"`` (rules 1-3 in the README's "Gate Decorator"): ``num = int(p * left)`` with
        ``left`` the alive BN-channel entries (a unit of k coupled BNs is k entries; decaying units
        count as removed) as they were at the previous tick's selection, all of them at the first
        (the original's driver reads ``left`` back a tick late); then :meth:`_threshold_choose`,
        which takes at least ``num + 1`` entries' worth. ``tick_rule="units"``: the
        ``max(1, int(p x units left now))`` lowest-scored units (:meth:`_choose`)."""
        self.controller.start_round()  # a round is one tick: cooldowns count ticks
        decaying = sorted(self.controller.decaying)
        excluded = self.controller.candidates_excluded()
        removed = self.removed()
        remaining = len(self.units) - len(removed)
        left = sum(n for k, n in self.entries.items() if k not in removed)
        scores = self.unit_scores().tolist()
        self.last_scores = scores
        threshold = None
        if self.tick_rule == "original":
            basis = sum(self.entries.values()) if self.left_lagged is None else self.left_lagged
            self.left_lagged = left
            count = int(self.prune_ratio * basis)
            chosen, threshold = self._threshold_choose(scores, count, excluded)
        else:
            basis = remaining
            count = max(1, int(self.prune_ratio * remaining))
            chosen = self._choose(scores, count, excluded)
        selected = len(chosen)
        if self.trim_to_target:
            chosen = self._prefix_to_target(removed, chosen)
        self.controller.admit([self.targets[k] for k in chosen])
        self.admitted += len(chosen)
        self._sync_masks()
        record = {
            "tick": self.ticks,
            "selected": [list(k) for k in chosen],
            "decaying_before": [list(k) for k in decaying],
            "excluded": len(excluded),
            "remaining_before": remaining,
            "left_entries_before": left,
            "count_basis": basis,
            "requested": count,
            "threshold": threshold,
            "trimmed_from": selected if len(chosen) < selected else None,
            "selected_entries": sum(self.entries[k] for k in chosen),
            "max_selected_score": max((scores[self.row[k]] for k in chosen), default=None),
            "flops_remaining": self.flops_remaining(),
        }
        self.tick_log.append(record)
        log.info(
            "tick %d: %d of %d remaining units (%d BN-channel entries) selected, %d decaying, native FLOPs left %.4f",
            self.ticks,
            len(chosen),
            remaining,
            record["selected_entries"],
            len(self.controller.decaying),
            record["flops_remaining"],
        )
        return record

    def _prefix_to_target(self, removed: frozenset, chosen: list[Hashable]) -> list[Hashable]:
        """The shortest prefix of ``chosen`` (lowest score first) whose removal with ``removed`` meets
        the FLOPs target; all of ``chosen`` when even that does not. MACs fall as units go, so a
        binary search over the prefix length finds it."""
        if not chosen or not self.target_met(removed | set(chosen)):
            return chosen
        lo, hi = 1, len(chosen)  # hi always meets the target
        while lo < hi:
            mid = (lo + hi) // 2
            if self.target_met(removed | set(chosen[:mid])):
                hi = mid
            else:
                lo = mid + 1
        return chosen[:hi]

    def candidates(self) -> dict[Hashable, Target]:
        """Every channel unit, as the controller's target (registered at construction)."""
        return self.targets

    def replacement(self, released: list[Target], excluded: frozenset) -> list[Target]:
        """budget=strict: the next-lowest units by the last tick's scores, one per released unit."""
        scores = self.last_scores or [0.0] * len(self.units)
        gone = excluded | {t.key for t in released}
        chosen = self._choose(scores, len(released), frozenset(gone))
        self.admitted += len(chosen)
        return [self.targets[k] for k in chosen]

    def drain_length(self) -> int:
        """Optimizer steps until every decaying unit reaches zero (0 when none decays)."""
        left = 0
        for key in self.controller.decaying:
            n, N = self.controller.decay_progress(key)
            left = max(left, (N - n) * self.controller.interval)
        return left

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "controller": self.controller.state_dict(),
            "scores": {n: s.clone() for n, s in self.scores.items()},
            "last_scores": self.last_scores,
            "masked": sorted(self.masked),
            "mode": self.mode,
            "current": self.current,
            "phase_step": self.phase_step,
            "phase_steps": self.phase_steps,
            "drain_total": self.drain_total,
            "ticks": self.ticks,
            "tocks": self.tocks,
            "drain_steps": self.drain_steps,
            "drains": self.drains,
            "drain_epochs": self.drain_epochs,
            "admitted": self.admitted,
            "tick_log": copy.deepcopy(self.tick_log),
            "left_lagged": self.left_lagged,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise UserError(
                f"a Gate Decorator checkpoint of state version {state.get('version')!r} (this dpm writes "
                f"{_STATE_VERSION}: its tick rules changed): rerun in a new run directory"
            )
        self.controller.load_state_dict(state["controller"])
        for n, s in state["scores"].items():
            self.scores[n].copy_(s)
        self.masked = {tuple(k) for k in state["masked"]}
        self.current = tuple(state["current"]) if state["current"] is not None else None
        for key in (
            "last_scores",
            "mode",
            "phase_step",
            "phase_steps",
            "drain_total",
            "ticks",
            "tocks",
            "drains",
            "drain_steps",
            "drain_epochs",
            "admitted",
            "left_lagged",
            "stop_reason",
        ):
            setattr(self, key, state[key])
        self.tick_log = copy.deepcopy(state["tick_log"])


def set_trainable(model: nn.Module, kind: str, tick_bn_bias: bool = True) -> None:
    """Which parameters train: in a tick or drain everything but the convolutions (the original's
    tick; ``tick_bn_bias=False`` freezes the BN biases too, dpm's earlier tick); in a tock
    everything; BN scales of gated BNs never (frozen at 1: the gate is the scale)."""
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if isinstance(m, GatedBatchNorm2d):
                p.requires_grad_(name == "gate" or (name == "bias" and (kind in ("tock", "finetune") or tick_bn_bias)))
            elif kind in ("tick", "drain"):
                p.requires_grad_(isinstance(m, nn.Linear))
            else:
                p.requires_grad_(True)
