"""The decay controller: Smooth Pruning and Self-Rectifying over a set of targets.

One object per model. A base pruner *admits* targets when it would prune them; the controller
decays their norm to exactly zero over N optimizer steps (docs/method.md section 3), optionally
releasing those the gradient defends (section 4), and keeps pruned slices at bit-exact zero.

Two ways to drive it:

* around a standard optimizer (DepGraph, Gate Decorator, a practitioner's loop)::

      ctl.admit(targets)            # between steps: decay step 1 on the live weights
      ...
      loss.backward()
      ctl.step(optimizer)           # = before_step(); optimizer.step(); after_step()

* from inside a custom optimizer's step (OTOv2's projecting step)::

      ctl.before_step(self)                   # pre-update x and raw gradient (for SR)
      trial = {p: p - lr * d_p for p in ...}  # the optimizer's trial point
      ctl.admit(new_groups, tensors=trial)    # step 1 on the trial point, not the live weight
      ctl.after_step(self, tensors=trial)     # steps 2..N / masks on the trial point
      for p in ...: p.copy_(trial[p])

Per step the work is a fixed number of tensor ops per parameter (see :mod:`dpm.core.segments`),
whatever the number of targets. The controller orchestrates; its state lives in :mod:`.params`
(the parameters by position), :mod:`.registry` (the targets and their status), :mod:`.tables`
(their per-target tensors), :mod:`.masks` (the pruned elements) and :mod:`.rectify` (what
Self-Rectifying computes per step).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, Iterable, Mapping

import torch

from . import schedules as _schedules
from .log import QUANTILES, DecayLog
from .masks import PrunedMasks
from .packing import Packing, RowPack
from .params import ParamIndex, ParamsLike, TensorMap
from .rectify import PreStep, RectifyConfig, grad_sq, record_pre, rectify_step, unpack_check
from .registry import DECAYING, PRUNED, RELEASED, TargetRegistry
from .segments import apply_factors, build_plan, element_mask, segment_sum
from .tables import DecayTable, FamilyTable
from .targets import Slice, Target

__all__ = ["DecayController"]

Replacement = Callable[[list[Target], frozenset], Iterable[Target]]

_STATE_VERSION = 1


def _integer(name: str, value: Any, minimum: int, other: str = "") -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{other}, got {value}")
    return int(value)


class DecayController:
    """Smooth Pruning (+ Self-Rectifying) for any base pruner and training loop.

    Args:
        params: a model (parameters named by ``named_parameters``), a ``{name: param}`` mapping or
            an iterable of parameters (named by position). Targets must slice these parameters;
            the names key the ``state_dict``.
        N: decay length in decay steps (optimizer iterations when ``interval=1``); N = 1 is the base
            method (zero at admission). Use :func:`dpm.core.resolve_decay_steps` for ``N_epochs``.
        interval: a decay step every ``interval`` optimizer steps.
        schedule: ``linear`` (paper), ``cosine`` or ``exp``.
        rectify: a :class:`RectifyConfig` to turn Self-Rectifying on; None for +SP only.
        include_consumers: also decay consumer slices (ablation; overlapping elements get the
            product of the factors of every target containing them).
        optimizer: the optimizer whose state of pruned slices is zeroed (also taken from
            ``before_step`` / ``after_step`` / ``step`` when passed there).
        replacement: called as ``replacement(released, excluded_keys)`` after releases, only under
            ``rectify.budget == "strict"`` (required there); returns the structures to admit in
            their place.
        track: number of targets (the first admitted) whose norm trajectory is logged; None logs
            every admitted target's (to see released ones: the first few are rarely among them).
        pack_rows: on CPU, keep the targets' parameters in one buffer per row shape
            (:mod:`dpm.core.packing`: same Parameter objects and values, no copies per step).
    """

    def __init__(
        self,
        params: ParamsLike,
        N: int,
        *,
        interval: int = 1,
        schedule: str = "linear",
        rectify: RectifyConfig | None = None,
        include_consumers: bool = False,
        optimizer: torch.optim.Optimizer | None = None,
        replacement: Replacement | None = None,
        track: int | None = 8,
        pack_rows: bool = True,
    ) -> None:
        self.N = _integer("N", N, 1)
        self.interval = _integer("interval", interval, 1)
        _schedules.schedule(schedule, 0.0, 1.0)  # validates the name with a clear message
        self.schedule = schedule
        if rectify is not None and not isinstance(rectify, RectifyConfig):
            raise TypeError("rectify must be a RectifyConfig or None")
        if rectify is not None and rectify.budget == "strict" and replacement is None:
            raise ValueError("budget='strict' needs a replacement callback (replacement=...)")
        self.rectify = rectify
        self.include_consumers = bool(include_consumers)
        self.replacement = replacement
        self.track = None if track is None else _integer("track", track, 0, " or None (every target)")
        self._optimizer = optimizer

        self.log = DecayLog()
        self._index = ParamIndex(params)
        self._registry = TargetRegistry(self._index, rectify.release_cooldown if rectify is not None else 1)
        self._packing = Packing(bool(pack_rows), self._index, self._registry.row_positions)
        self._prune_at: dict[int, list[Hashable]] = {}
        self._tracked: dict[Hashable, None] = {}  # an ordered set: admission order, O(1) lookups
        self._step = 0
        self._in_step = False
        self._pre: PreStep | None = None
        self._decaying_mask_cache: dict[int, torch.Tensor] = {}
        self._masks = PrunedMasks(self._index)
        self._families = FamilyTable.empty(self._index.device)
        self._decays = DecayTable.empty(self._index.device)
        self._rebuild_all()

    # ------------------------------------------------------------------ parameters
    def bind(self, params: ParamsLike) -> None:
        """Re-point the controller at a (physically pruned) model's new parameters.

        Decaying and pruned targets must still slice parameters of the new set (``forget`` the
        removed ones first). Registered targets on parameters that disappeared are dropped;
        released ones keep their cooldown but lose their description until re-registered.
        """
        old = self._index.named()
        self._index.bind(params)
        try:
            self._registry.drop_unbound()
        except ValueError:
            self._index.bind(old)
            raise
        self._rebuild_all()

    # ------------------------------------------------------------------ target sets
    def register(self, targets: Iterable[Target]) -> None:
        """Make targets known as family members without admitting them.

        C_len compares a decaying target's gradient with the mean over its family's non-pruned
        members: register the whole family (every candidate channel of the layer / group) so the
        mean is not taken over the decaying members alone. Re-registering a key replaces its
        description unless the target is decaying or pruned.
        """
        targets = list(targets)
        self._registry.check_new(targets, admitting=False)
        if self._registry.describe(targets):
            self._rebuild_families()

    # ------------------------------------------------------------------ admission
    @torch.no_grad()
    def admit(
        self,
        targets: Iterable[Target],
        tensors: TensorMap | None = None,
        *,
        N: int | None = None,
    ) -> None:
        """Start the decay of ``targets``: record ``L0 = ||x||`` and apply decay step 1 at once.

        Step 1 is applied to ``tensors[param]`` when given (OTOv2: the trial point inside the
        projecting step), else to the live parameters (DepGraph / Gate Decorator: between steps).
        Called between ``before_step`` and ``after_step`` (inside a step), step 2 comes at the end
        of the *next* optimizer step; called between steps, at the end of the next one.
        With N = 1 (or L0 = 0) the targets are pruned at once: zeroed, masked, optimizer state
        zeroed -- the base method exactly.
        """
        targets = list(targets)
        if not targets:
            return
        N = self.N if N is None else _integer("N", N, 1)
        reg = self._registry
        reg.check_new(targets, admitting=True)
        reg.check_overlap(targets)
        get = self._index.getter(tensors)
        if reg.describe(targets):
            self._rebuild_families()
        targets = [reg.targets[t.key] for t in targets]

        plan = build_plan(targets, self._index.position, self._index.device)
        L0 = segment_sum(plan, lambda pos: (get(pos), get(pos)), torch.float64, self._index.device).sqrt()
        s1 = float(_schedules.schedule(self.schedule, 1.0, float(N)))
        # x~ = x at admission, so the projection s(1) L0 / ||x~|| is the plain factor s(1).
        factor = torch.where(L0 > 0, torch.full_like(L0, s1), torch.zeros_like(L0))
        full = build_plan(targets, self._index.position, self._index.device, self.include_consumers)
        apply_factors(full, factor, get)

        # Step 2 comes `interval` optimizer steps after step 1 (admitted inside a step, that step
        # is the one that applied step 1 and does not count).
        first = self._step + (1 if self._in_step else 0) + self.interval - 1
        L0_host = L0.tolist()
        now_pruned, now_decaying = [], []
        for t, l0 in zip(targets, L0_host):
            key = t.key
            # Decaying even if pruned at once: immediately pruned ones move on in _mark_pruned.
            if reg.start_decay(key, (l0, N, first)):
                self.log.readmissions.append({"step": self._step, "round": reg.round, "key": key})
            if key not in self._tracked and (self.track is None or len(self._tracked) < self.track):
                self._tracked[key] = None
            if key in self._tracked:
                self.log.trajectories.setdefault(key, []).append((self._step, 1, s1 * l0))
            if N == 1 or l0 == 0.0:
                now_pruned.append(key)
            else:
                now_decaying.append(key)
                self._prune_at.setdefault(first + (N - 2) * self.interval, []).append(key)
        if now_pruned:
            self._mark_pruned(now_pruned)
            positions = {self._index.position(s.param) for k in now_pruned for s in reg.targets[k].slices}
            self._masks.apply(get, self._optimizer, positions)
        self._rebuild_decays(now_decaying)
        self._decaying_mask_cache.clear()

    # ------------------------------------------------------------------ steps
    def step(self, optimizer: torch.optim.Optimizer) -> Any:
        """``before_step(optimizer)``, ``optimizer.step()``, ``after_step(optimizer)``."""
        self.before_step(optimizer)
        try:
            out = optimizer.step()
        except BaseException:
            # The update did not happen: leave the controller between steps (checkpointable, and
            # the next step() starts afresh) instead of stuck inside this one.
            self._abort_step()
            raise
        self.after_step(optimizer)
        return out

    def _abort_step(self) -> None:
        self._in_step = False
        self._pre = None

    @torch.no_grad()
    def before_step(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float | None = None,
        grads: TensorMap | None = None,
    ) -> None:
        """Record what Self-Rectifying needs from *before* the optimizer update.

        Call after ``backward()`` (and after ``GradScaler.unscale_``), before ``optimizer.step()``.
        Reads ``x`` from the parameters and the raw loss gradient from ``param.grad`` (or
        ``grads[param]``); the learning rate from the optimizer's param groups (or ``lr``).
        Without SR it only marks the start of a step.
        """
        if optimizer is not None:
            self._optimizer = optimizer
        self._in_step = True
        self._pre = None
        try:
            self._record_pre(lr, grads)
        except BaseException:
            self._abort_step()  # a failed before_step must not leave the controller inside a step
            raise

    def _record_pre(self, lr: float | None, grads: TensorMap | None) -> None:
        if self.rectify is None or self._registry.num[DECAYING] == 0:
            return
        radial = self.rectify.c_rate_form == "radial"
        self._pre = record_pre(
            self.rectify.c_rate_form,
            self._families,
            self._decays,
            self._index.params,
            functools.partial(self._index.grad, grads=grads),
            self._index.learning_rates(self._optimizer, lr) if radial else None,
            self._index.device,
            self._packing.current(),
        )

    @torch.no_grad()
    def after_step(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        tensors: TensorMap | None = None,
    ) -> None:
        """Decay steps 2..N, releases, and the pruned masks, after the optimizer update.

        Projects each due target onto ``x <- x~ s(n) L0 / ||x~||``, where ``x~`` is the updated
        parameter (or ``tensors[param]``, the trial point inside a custom optimizer's step);
        re-zeroes pruned slices and their optimizer state.
        """
        if optimizer is not None:
            self._optimizer = optimizer
        reg = self._registry
        if self.rectify is not None and not self._in_step and reg.num[DECAYING] > 0:
            raise RuntimeError(
                "self-rectifying needs before_step() before optimizer.step() (or use controller.step(optimizer))"
            )
        self._in_step = True  # replacements admitted below start their decay at the next step
        k = self._step
        get = self._index.getter(tensors)
        decaying_before = reg.num[DECAYING]
        record: dict[str, Any] | None = None
        released_now: list[Hashable] = []
        if decaying_before > 0:
            record, released_now = self._decay_step(k, get, self._packing.current())
        pre_released = [reg.targets[key] for key in released_now if key in reg.targets]
        self._pre = None

        finished = [key for key in self._prune_at.pop(k, []) if reg.status.get(key) == DECAYING]
        if finished:
            self._mark_pruned(finished)
        if pre_released and self.rectify is not None and self.rectify.budget == "strict":
            assert self.replacement is not None
            subs = list(self.replacement(pre_released, self.candidates_excluded()))
            self.admit(subs, tensors)
        self._masks.apply(get, self._optimizer)
        if record is not None or finished:
            record = record or {"step": k}
            record.update(self.counts())
            record["released_now"] = len(released_now)
            self.log.history.append(record)
        self._step += 1
        self._in_step = False

    def _decay_step(
        self, k: int, get: Callable[[int], torch.Tensor], pack: RowPack | None
    ) -> tuple[dict[str, Any], list[Hashable]]:
        table = self._decays
        device = self._index.device
        norm_after = segment_sum(table.plan, lambda pos: (get(pos), get(pos)), torch.float64, device, pack=pack).sqrt()
        since = k - table.first
        due = table.active & (since >= 0) & (since.remainder(self.interval) == 0)
        n = (2 + torch.div(since, self.interval, rounding_mode="floor")).to(torch.float64)
        target_norm = _schedules.schedule(self.schedule, n, table.N) * table.L0
        positive = norm_after > 0
        # ||x~|| = 0 stays 0 (factor 0) instead of producing NaN.
        factor = torch.where(positive, target_norm / torch.where(positive, norm_after, 1.0), 0.0)
        sr_pack: list[torch.Tensor] = []
        check = None
        if self.rectify is not None and self._pre is not None:
            factor, check, sr_pack = rectify_step(
                self.rectify,
                self._pre,
                table,
                self._families,
                norm_after=norm_after,
                n=n,
                due=due,
                factor=factor,
                quantiles=self._quantiles,
            )
        factor = torch.where(due, factor, 1.0)
        apply_factors(table.full_plan, factor, get, pack)
        tracked = (norm_after * factor.abs()).index_select(0, table.track_rows)
        # One device->host transfer per step for everything the host needs (logs, releases).
        host = torch.cat([tracked] + sr_pack).tolist()

        record: dict[str, Any] = {"step": k}
        reg = self._registry
        n_track = len(table.track_keys)
        for key, norm in zip(table.track_keys, host[:n_track]):
            if reg.status.get(key) != DECAYING:
                continue
            first = reg.decay[key][2]
            if k >= first and (k - first) % self.interval == 0:
                self.log.trajectories[key].append((k, 2 + (k - first) // self.interval, norm))
        released: list[Hashable] = []
        if check is not None:
            percentiles, released_rows = unpack_check(host[n_track:])
            record.update(percentiles)
            for row, rate_v, len_v in released_rows:
                key = table.keys[row]
                released.append(key)
                self.log.releases.append({"step": k, "round": reg.round, "key": key, "c_rate": rate_v, "c_len": len_v})
            if released:
                self._mark_released(released)
        return record, released

    def _mark_released(self, keys: list[Hashable]) -> None:
        self._registry.release(keys)
        self._decays.deactivate(keys)
        self._decaying_mask_cache.clear()

    def _mark_pruned(self, keys: list[Hashable]) -> None:
        self._registry.prune(keys)
        self._masks.add(s for key in keys for s in self._masked_slices(self._registry.targets[key]))
        self._decays.deactivate(keys)
        self._families.uncount(keys)
        self._decaying_mask_cache.clear()

    def _masked_slices(self, t: Target) -> tuple[Slice, ...]:
        return t.slices if self.include_consumers else t.producers

    # ------------------------------------------------------------------ tables
    def _rebuild_all(self) -> None:
        self._quantiles = torch.tensor(list(QUANTILES.values()), dtype=torch.float64, device=self._index.device)
        reg = self._registry
        self._masks = PrunedMasks(self._index)
        self._masks.add(
            s
            for key, st in reg.status.items()
            if st == PRUNED and key in reg.targets
            for s in self._masked_slices(reg.targets[key])
        )
        self._decays = DecayTable.empty(self._index.device)  # from scratch: no row is carried over
        self._rebuild_families()
        self._rebuild_decays([], keep=[k for k, st in reg.status.items() if st == DECAYING])
        self._decaying_mask_cache.clear()

    def _rebuild_families(self) -> None:
        """The table of every known target (C_len families), rebuilt when the set changes."""
        reg = self._registry
        # Rows in status order, the order a checkpoint restores: after bind() + register() the
        # descriptions' own order can differ from it, and C_len's family sums follow the rows.
        rows = [reg.targets[k] for k in reg.status if k in reg.targets] if self.rectify is not None else []
        self._families = FamilyTable.build(rows, reg.keys(PRUNED), self._index.position, self._index.device)
        self._packing.invalidate()  # the registered set changed: the next step packs it
        if self._pre is not None and self.rectify is not None:
            # Registered mid-step (inside a custom optimizer): their gradients are still at hand.
            self._pre.gg = grad_sq(self._families, self._pre.grad, self._index.device)
        self._decays.link(self._families)

    def _rebuild_decays(self, new: list[Hashable], keep: list[Hashable] | None = None) -> None:
        """Compact the decay table to the decaying targets and append ``new`` ones."""
        reg = self._registry
        old_row = self._decays.row
        if keep is None:
            # A re-admitted key goes to the end like any new one, never back to the stale row of
            # its earlier decay: the order must not depend on when the table was last compacted
            # (a resumed run starts compacted), or releases in one step come out in another order.
            fresh = set(new)
            keep = [k for k in self._decays.keys if reg.status.get(k) == DECAYING and k not in fresh]
        keys = keep + [k for k in new if k not in set(keep)]
        self._decays = DecayTable.build(
            keys,
            reg.targets,
            reg.decay,
            families=self._families,
            tracked=self._tracked,
            position=self._index.position,
            device=self._index.device,
            consumers=self.include_consumers,
        )
        if self._pre is not None:
            self._pre = self._pre.carried(old_row, keep, len(keys))

    # ------------------------------------------------------------------ queries
    def start_round(self) -> None:
        """Begin a new selection round (DepGraph: a pruning round; Gate Decorator: a tick).

        Released targets stay excluded from candidates for ``release_cooldown`` rounds.
        """
        self._registry.round += 1

    @property
    def round(self) -> int:
        """The current selection round (0 before the first ``start_round``)."""
        return self._registry.round

    @property
    def iteration(self) -> int:
        """Optimizer steps completed under this controller."""
        return self._step

    def candidates_excluded(self) -> frozenset:
        """Keys the base method must not select: decaying, pruned and cooling-down released."""
        return self._registry.excluded()

    def status(self, key: Hashable) -> str | None:
        """``registered`` | ``decaying`` | ``pruned`` | ``released``, or None if unknown."""
        return self._registry.status.get(key)

    def is_decaying(self, key: Hashable) -> bool:
        """Whether the target ``key`` is in the decay set D."""
        return self._registry.status.get(key) == DECAYING

    @property
    def decaying(self) -> frozenset:
        """Keys of the targets currently decaying."""
        return self._registry.keys(DECAYING)

    @property
    def pruned(self) -> frozenset:
        """Keys of the targets decayed to zero (kept at zero until removed and ``forget``-ed)."""
        return self._registry.keys(PRUNED)

    @property
    def released(self) -> frozenset:
        """Keys of the targets released by Self-Rectifying (and not re-admitted since)."""
        return self._registry.keys(RELEASED)

    def target(self, key: Hashable) -> Target:
        """The stored description of target ``key``."""
        return self._registry.targets[key]

    def counts(self) -> dict[str, int]:
        """Sizes of the target sets, plus cumulative releases and re-admissions."""
        return {
            "decaying": self._registry.num[DECAYING],
            "pruned": self._registry.num[PRUNED],
            "released": self._registry.num[RELEASED],
            "releases_total": len(self.log.releases),
            "readmissions": len(self.log.readmissions),
        }

    def decay_progress(self, key: Hashable) -> tuple[int, int] | None:
        """``(n, N)`` for a decaying target: decay steps applied so far and its length."""
        if self._registry.status.get(key) != DECAYING:
            return None
        _, N, first = self._registry.decay[key]
        done = 1 + max(0, (self._step - first + self.interval - 1) // self.interval)
        return min(done, N), N

    def decaying_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Boolean mask (param's shape): elements in slices of decaying targets.

        What OTOv2 excludes from its own half-space projection. Cached until the decay set changes.
        """
        pos = self._index.position(param)
        mask = self._decaying_mask_cache.get(pos)
        if mask is None:
            reg = self._registry
            slices = [
                (s.dim, s.indices)
                for k in self._decays.keys
                if reg.status[k] == DECAYING
                for s in self._masked_slices(reg.targets[k])
                if s.param is param
            ]
            mask = element_mask(param, slices)
            self._decaying_mask_cache[pos] = mask
        return mask

    def pruned_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Boolean mask (param's shape): elements held at zero for pruned targets."""
        return self._masks.of(param)

    def forget(self, keys: Iterable[Hashable] | None = None) -> None:
        """Drop targets from the controller (default: every pruned one).

        Call after the base method removed pruned structures physically; then ``bind`` the new
        parameters. A forgotten decaying target simply stops decaying (no release is logged).
        """
        self._registry.forget(list(self.pruned if keys is None else keys))
        self._rebuild_all()

    # ------------------------------------------------------------------ checkpoints
    def _config(self) -> dict[str, Any]:
        return {
            "N": self.N,
            "interval": self.interval,
            "schedule": self.schedule,
            "include_consumers": self.include_consumers,
            "rectify": None if self.rectify is None else self.rectify.to_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the decay exactly (targets by parameter name)."""
        if self._in_step:
            raise RuntimeError("state_dict() inside a step: save between optimizer steps")
        reg = self._registry
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "step": self._step,
            "round": reg.round,
            "targets": reg.records(),
            # The decaying rows only: stale (released / pruned) rows wait for the next compaction.
            "decay_order": [k for k in self._decays.keys if reg.status.get(k) == DECAYING],
            "prune_at": [(k, list(v)) for k, v in self._prune_at.items()],
            "tracked": list(self._tracked),
            "log": self.log.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` onto a controller built with the same settings."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported DecayController state version {state.get('version')}")
        if state["config"] != self._config():
            raise ValueError(
                f"DecayController settings differ from the checkpoint's: {state['config']} vs {self._config()}"
            )
        reg = self._registry
        reg.load_records(state["targets"])
        self._prune_at = {int(k): list(v) for k, v in state["prune_at"]}
        self._tracked = dict.fromkeys(state["tracked"])
        self._step, reg.round = int(state["step"]), int(state["round"])
        self._in_step, self._pre = False, None
        self.log.load_state_dict(state["log"])
        self._rebuild_all()
        # Same row order as the saved table, so segment sums accumulate identically.
        order = [k for k in state["decay_order"] if reg.status.get(k) == DECAYING]
        rest = [k for k, st in reg.status.items() if st == DECAYING and k not in set(order)]
        self._rebuild_decays([], keep=order + rest)
