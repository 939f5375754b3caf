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
whatever the number of targets.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Iterable, Mapping

import torch
from torch import nn

from . import schedules as _schedules
from .log import QUANTILES, DecayLog
from .optim_state import zero_state_slices
from .rectify import RectifyConfig, c_len, c_rate, release_rule
from .segments import Plan, apply_factors, build_plan, element_mask, pre_step_sums, segment_sum
from .targets import Slice, Target

__all__ = ["DecayController"]

ParamsLike = nn.Module | Iterable[torch.Tensor] | Mapping[str, torch.Tensor]
TensorMap = Mapping[torch.Tensor, torch.Tensor]
Replacement = Callable[[list[Target], frozenset], Iterable[Target]]

REGISTERED, DECAYING, PRUNED, RELEASED = "registered", "decaying", "pruned", "released"
_STATE_VERSION = 1


def _named_params(params: ParamsLike) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, nn.Module):
        return list(params.named_parameters())  # shared parameters are listed once
    if isinstance(params, Mapping):
        return [(str(k), v) for k, v in params.items()]
    out, seen = [], set()
    for i, p in enumerate(params):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((str(i), p))
    return out


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
    ) -> None:
        self.N = self._check_N(N)
        if int(interval) != interval or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval}")
        self.interval = int(interval)
        _schedules.schedule(schedule, 0.0, 1.0)  # validates the name with a clear message
        self.schedule = schedule
        if rectify is not None and not isinstance(rectify, RectifyConfig):
            raise TypeError("rectify must be a RectifyConfig or None")
        if rectify is not None and rectify.budget == "strict" and replacement is None:
            raise ValueError("budget='strict' needs a replacement callback (replacement=...)")
        self.rectify = rectify
        self.include_consumers = bool(include_consumers)
        self.replacement = replacement
        if track is not None and (int(track) != track or track < 0):
            raise ValueError(f"track must be an integer >= 0 or None (every target), got {track}")
        self.track = None if track is None else int(track)
        self._optimizer = optimizer
        self._group_cache: tuple[tuple[int, int, int], dict[int, dict]] | None = None

        self.log = DecayLog()
        self._targets: dict[Hashable, Target] = {}
        self._status: dict[Hashable, str] = {}
        self._decay: dict[Hashable, tuple[float, int, int]] = {}  # key -> (L0, N, first decay step)
        self._released_round: dict[Hashable, int] = {}
        self._prune_at: dict[int, list[Hashable]] = {}
        self._tracked: dict[Hashable, None] = {}  # an ordered set: admission order, O(1) lookups
        self._num = {DECAYING: 0, PRUNED: 0, RELEASED: 0}
        self._step = 0
        self._round = 0
        self._in_step = False
        self._pre: dict[str, Any] | None = None
        self._decaying_mask_cache: dict[int, torch.Tensor] = {}
        self._set_registry(params)
        self._rebuild_all()

    # ------------------------------------------------------------------ registry
    @staticmethod
    def _check_N(N: Any) -> int:
        if isinstance(N, bool) or int(N) != N or N < 1:
            raise ValueError(f"N must be an integer >= 1, got {N}")
        return int(N)

    def _set_registry(self, params: ParamsLike) -> None:
        named = _named_params(params)
        if not named:
            raise ValueError("DecayController needs at least one parameter")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._pos = {id(p): i for i, p in enumerate(self._params)}
        self._by_name = {n: i for i, n in enumerate(self._names)}
        self._device = self._params[0].device
        self._group_cache = None

    def _position(self, param: torch.Tensor) -> int:
        try:
            return self._pos[id(param)]
        except KeyError:
            raise ValueError(
                f"a target slices a {tuple(param.shape)} tensor that is not among the controller's "
                "parameters: build targets from the same model/parameters given to DecayController "
                "(after replacing parameters, call bind())"
            ) from None

    def bind(self, params: ParamsLike) -> None:
        """Re-point the controller at a (physically pruned) model's new parameters.

        Decaying and pruned targets must still slice parameters of the new set (``forget`` the
        removed ones first). Registered targets on parameters that disappeared are dropped;
        released ones keep their cooldown but lose their description until re-registered.
        """
        old_params = self._params
        self._set_registry(params)
        for key in list(self._targets):
            t = self._targets[key]
            if all(id(s.param) in self._pos for s in t.slices):
                continue
            st = self._status[key]
            if st in (DECAYING, PRUNED):
                self._set_registry(old_params)
                raise ValueError(
                    f"bind(): {st} target {key!r} slices a parameter that is not in the new set; "
                    "forget() it first or wait until its decay ends"
                )
            del self._targets[key]
            if st == REGISTERED:
                del self._status[key]
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
        self._check_new(targets, admitting=False)
        changed = self._add_descriptions(targets)
        if changed:
            self._rebuild_registered()

    def _check_new(self, targets: list[Target], admitting: bool) -> None:
        seen: set = set()
        for t in targets:
            if not isinstance(t, Target):
                raise TypeError(f"expected Target, got {type(t).__name__}")
            if t.key in seen:
                raise ValueError(f"target key {t.key!r} appears twice")
            seen.add(t.key)
            for s in t.slices:
                self._position(s.param)
            st = self._status.get(t.key)
            old = self._targets.get(t.key)
            if st in (DECAYING, PRUNED):
                if admitting:
                    raise ValueError(f"target {t.key!r} is already {st}; it cannot be admitted again")
                if old is not None and not old.same_as(t):
                    raise ValueError(f"target {t.key!r} is {st}: its slices cannot change")
            if admitting and st == RELEASED and self._cooling(t.key):
                raise ValueError(
                    f"target {t.key!r} was released in round {self._released_round[t.key]} and is "
                    f"excluded for {self.rectify.release_cooldown if self.rectify else 1} round(s): "
                    "select candidates outside candidates_excluded()"
                )
        # Families never mix layers: every member slices the same producer parameters.
        incoming = {t.key for t in targets}
        fams: dict[Hashable, tuple[Hashable, frozenset[int]]] = {}
        members = [u for k, u in self._targets.items() if k not in incoming] + targets
        for t in members:
            ps = frozenset(self._position(s.param) for s in t.producers)
            ref_key, ref = fams.setdefault(t.family, (t.key, ps))
            if ref != ps:
                raise ValueError(
                    f"family {t.family!r} mixes layers: target {t.key!r} slices parameters "
                    f"{sorted(self._names[i] for i in ps)}, member {ref_key!r} "
                    f"{sorted(self._names[i] for i in ref)}"
                )

    def _add_descriptions(self, targets: list[Target]) -> bool:
        changed = False
        for t in targets:
            old = self._targets.get(t.key)
            if old is not None and old.same_as(t):
                continue
            if self._status.get(t.key) in (DECAYING, PRUNED):
                continue
            self._targets[t.key] = t
            self._status.setdefault(t.key, REGISTERED)
            changed = True
        return changed

    def _cooling(self, key: Hashable) -> bool:
        if self._status.get(key) != RELEASED:
            return False
        cooldown = self.rectify.release_cooldown if self.rectify is not None else 1
        return self._round < self._released_round[key] + cooldown

    def _check_overlap(self, targets: list[Target]) -> None:
        # Producer elements belong to at most one decaying/pruned target, or the norm each one is
        # projected to would be undefined. Checked at admission only (never per step).
        owned: dict[int, tuple[int, set[int]]] = {}

        def claim(t: Target) -> None:
            for s in t.producers:
                pos = self._position(s.param)
                dim, idx = owned.setdefault(pos, (s.dim, set()))
                if dim != s.dim or idx.intersection(s.indices):
                    raise ValueError(
                        f"target {t.key!r} overlaps the producer slices of another decaying or "
                        f"pruned target on parameter {self._names[pos]!r}"
                    )
                idx.update(s.indices)

        for key, st in self._status.items():
            if st in (DECAYING, PRUNED) and key in self._targets:
                claim(self._targets[key])
        for t in targets:
            claim(t)

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
        N = self.N if N is None else self._check_N(N)
        self._check_new(targets, admitting=True)
        self._check_overlap(targets)
        get = self._getter(tensors)
        if self._add_descriptions(targets):
            self._rebuild_registered()
        targets = [self._targets[t.key] for t in targets]

        plan = build_plan(targets, self._position, self._device)
        L0 = segment_sum(plan, lambda pos: (get(pos), get(pos)), torch.float64, self._device).sqrt()
        s1 = float(_schedules.schedule(self.schedule, 1.0, float(N)))
        # x~ = x at admission, so the projection s(1) L0 / ||x~|| is the plain factor s(1).
        factor = torch.where(L0 > 0, torch.full_like(L0, s1), torch.zeros_like(L0))
        full = build_plan(targets, self._position, self._device, self.include_consumers)
        apply_factors(full, factor, get)

        # Step 2 comes `interval` optimizer steps after step 1 (admitted inside a step, that step
        # is the one that applied step 1 and does not count).
        first = self._step + (1 if self._in_step else 0) + self.interval - 1
        L0_host = L0.tolist()
        now_pruned, now_decaying = [], []
        for t, l0 in zip(targets, L0_host):
            key = t.key
            if self._status[key] == RELEASED:
                self._num[RELEASED] -= 1
                self.log.readmissions.append({"step": self._step, "round": self._round, "key": key})
            self._released_round.pop(key, None)
            self._decay[key] = (l0, N, first)
            if key not in self._tracked and (self.track is None or len(self._tracked) < self.track):
                self._tracked[key] = None
            if key in self._tracked:
                self.log.trajectories.setdefault(key, []).append((self._step, 1, s1 * l0))
            self._status[key] = DECAYING  # immediately pruned ones move on in _mark_pruned
            self._num[DECAYING] += 1
            if N == 1 or l0 == 0.0:
                now_pruned.append(key)
            else:
                now_decaying.append(key)
                self._prune_at.setdefault(first + (N - 2) * self.interval, []).append(key)
        if now_pruned:
            self._mark_pruned(now_pruned)
            self._apply_masks(
                get, positions={self._position(s.param) for k in now_pruned for s in self._targets[k].slices}
            )
        self._rebuild_decay_table(now_decaying)
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
        if self.rectify is None or self._num[DECAYING] == 0:
            return
        dev = self._device
        params = self._params
        radial = self.rectify.c_rate_form == "radial"
        fused = pre_step_sums(
            self._R_plan,
            self._D_plan,
            [params[pos] for pos, _ in self._R_plan.entries],
            [self._grad(pos, grads) for pos, _ in self._R_plan.entries],
            torch.float64,
            self._learning_rates(lr) if radial else None,
        )
        if fused is not None:  # CPU: one concatenation of x and one of g serve all three sums
            xx, gx, gg = fused
            self._pre = {"xx": xx, "gx": gx, "grads": grads, "gg": gg}
            return
        xx = segment_sum(self._D_plan, lambda pos: (params[pos], params[pos]), torch.float64, dev)
        gx = None
        if self.rectify.c_rate_form == "radial":

            def g_x(pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
                g = self._grad(pos, grads)
                return None if g is None else (g, params[pos])

            gx = segment_sum(self._D_plan, g_x, torch.float64, dev, weights=self._learning_rates(lr))
        self._pre = {"xx": xx, "gx": gx, "grads": grads}
        self._pre["gg"] = self._grad_sq(grads)

    def _grad_sq(self, grads: TensorMap | None) -> torch.Tensor:
        def g_g(pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            g = self._grad(pos, grads)
            return None if g is None else (g, g)

        return segment_sum(self._R_plan, g_g, torch.float64, self._device)

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
        if self.rectify is not None and not self._in_step and self._num[DECAYING] > 0:
            raise RuntimeError(
                "self-rectifying needs before_step() before optimizer.step() (or use controller.step(optimizer))"
            )
        self._in_step = True  # replacements admitted below start their decay at the next step
        k = self._step
        get = self._getter(tensors)
        decaying_before = self._num[DECAYING]
        record: dict[str, Any] | None = None
        released_now: list[Hashable] = []
        if decaying_before > 0:
            record, released_now = self._decay_step(k, get)
        pre_released = [self._targets[key] for key in released_now if key in self._targets]
        self._pre = None

        finished = [key for key in self._prune_at.pop(k, []) if self._status.get(key) == DECAYING]
        if finished:
            self._mark_pruned(finished)
        if pre_released and self.rectify is not None and self.rectify.budget == "strict":
            assert self.replacement is not None
            subs = list(self.replacement(pre_released, self.candidates_excluded()))
            self.admit(subs, tensors)
        self._apply_masks(get)
        if record is not None or finished:
            record = record or {"step": k}
            record.update(self.counts())
            record["released_now"] = len(released_now)
            self.log.history.append(record)
        self._step += 1
        self._in_step = False

    def _decay_step(self, k: int, get: Callable[[int], torch.Tensor]) -> tuple[dict[str, Any], list[Hashable]]:
        norm_after = segment_sum(self._D_plan, lambda pos: (get(pos), get(pos)), torch.float64, self._device).sqrt()
        since = k - self._D_first
        due = self._D_active & (since >= 0) & (since.remainder(self.interval) == 0)
        n = (2 + torch.div(since, self.interval, rounding_mode="floor")).to(torch.float64)
        target_norm = _schedules.schedule(self.schedule, n, self._D_N) * self._D_L0
        positive = norm_after > 0
        # ||x~|| = 0 stays 0 (factor 0) instead of producing NaN.
        factor = torch.where(positive, target_norm / torch.where(positive, norm_after, 1.0), 0.0)
        sr_pack: list[torch.Tensor] = []
        check = None
        if self.rectify is not None and self._pre is not None:
            cfg = self.rectify
            check = due & (n < self._D_N)  # every decay step except the last
            rate = c_rate(
                cfg.c_rate_form,
                norm_before=self._pre["xx"].sqrt(),
                norm_after=norm_after,
                step_length=self._D_L0 / self._D_N,
                lr_grad_dot_x=self._pre["gx"],
            )
            lens = c_len(self._pre["gg"].sqrt(), self._R_family, self._R_counted, self._num_families).index_select(
                0, self._D_to_R
            )
            release = check & release_rule(rate, lens, cfg)
            # A released target skips this step's projection: it keeps x~.
            factor = torch.where(release, 1.0, factor)
            nan = torch.full_like(rate, math.nan)
            released_rows = release.nonzero().flatten()
            sr_pack = [
                torch.nanquantile(torch.where(check, rate, nan), self._quantiles),
                torch.nanquantile(torch.where(check, lens, nan), self._quantiles),
                rate.index_select(0, released_rows),
                lens.index_select(0, released_rows),
                released_rows.to(torch.float64),
            ]
        factor = torch.where(due, factor, 1.0)
        apply_factors(self._D_full_plan, factor, get)
        tracked = (norm_after * factor.abs()).index_select(0, self._D_track_rows)
        # One device->host transfer per step for everything the host needs (logs, releases).
        host = torch.cat([tracked] + sr_pack).tolist()

        record: dict[str, Any] = {"step": k}
        n_track = len(self._D_track_keys)
        for key, norm in zip(self._D_track_keys, host[:n_track]):
            if self._status.get(key) != DECAYING:
                continue
            first = self._decay[key][2]
            if k >= first and (k - first) % self.interval == 0:
                self.log.trajectories[key].append((k, 2 + (k - first) // self.interval, norm))
        released: list[Hashable] = []
        if check is not None:
            q = len(QUANTILES)
            rq, lq = host[n_track : n_track + q], host[n_track + q : n_track + 2 * q]
            rest = host[n_track + 2 * q :]
            m = len(rest) // 3
            if not math.isnan(rq[0]):
                record["c_rate"] = dict(zip(QUANTILES, rq))
                record["c_len"] = dict(zip(QUANTILES, lq))
            for rate_v, len_v, row in zip(rest[:m], rest[m : 2 * m], rest[2 * m :]):
                key = self._D_keys[int(row)]
                released.append(key)
                self.log.releases.append(
                    {"step": k, "round": self._round, "key": key, "c_rate": rate_v, "c_len": len_v}
                )
            if released:
                self._mark_released(released)
        return record, released

    def _mark_released(self, keys: list[Hashable]) -> None:
        rows = []
        for key in keys:
            self._status[key] = RELEASED
            self._released_round[key] = self._round
            self._decay.pop(key, None)
            self._num[DECAYING] -= 1
            self._num[RELEASED] += 1
            rows.append(self._D_row[key])
        self._D_active[torch.tensor(rows, dtype=torch.long, device=self._device)] = False
        self._decaying_mask_cache.clear()

    def _mark_pruned(self, keys: list[Hashable]) -> None:
        d_rows, r_rows = [], []
        touched: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for key in keys:
            self._status[key] = PRUNED
            self._num[DECAYING] -= 1
            self._num[PRUNED] += 1
            if key in self._D_row:
                d_rows.append(self._D_row[key])
            if key in self._R_row:
                r_rows.append(self._R_row[key])
            for s in self._masked_slices(self._targets[key]):
                touched.setdefault(self._position(s.param), []).append((s.dim, s.indices))
        for pos, slices in touched.items():
            new = element_mask(self._params[pos], slices)
            old = self._masks.get(pos)
            self._masks[pos] = new if old is None else old | new
        if d_rows:
            self._D_active[torch.tensor(d_rows, dtype=torch.long, device=self._device)] = False
        if r_rows and self._R_counted.numel():
            self._R_counted[torch.tensor(r_rows, dtype=torch.long, device=self._device)] = False
        self._decaying_mask_cache.clear()

    def _masked_slices(self, t: Target) -> tuple[Slice, ...]:
        return t.slices if self.include_consumers else t.producers

    def _apply_masks(self, get: Callable[[int], torch.Tensor], positions: set[int] | None = None) -> None:
        # masked_fill (not a multiply) so pruned elements are +0.0, bitwise what zero_() gives.
        for pos, mask in self._masks.items():
            if positions is not None and pos not in positions:
                continue
            get(pos).masked_fill_(mask, 0)
            zero_state_slices(self._optimizer, self._params[pos], mask)

    # ------------------------------------------------------------------ helpers
    def _getter(self, tensors: TensorMap | None) -> Callable[[int], torch.Tensor]:
        if not tensors:
            return self._params.__getitem__
        for p, t in tensors.items():
            if t.shape != p.shape:
                raise ValueError(f"tensors[param] has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")

        def get(pos: int) -> torch.Tensor:
            p = self._params[pos]
            return tensors.get(p, p)

        return get

    def _grad(self, pos: int, grads: TensorMap | None) -> torch.Tensor | None:
        p = self._params[pos]
        if grads is not None and p in grads:
            return grads[p]
        return p.grad

    def _learning_rates(self, lr: float | None) -> Callable[[int], float]:
        if lr is not None:
            return lambda pos: float(lr)
        opt = self._optimizer
        if opt is None:
            raise ValueError("radial C_rate needs the learning rate: pass an optimizer or lr=")
        # Re-read the groups when the optimizer or its group/parameter counts changed (e.g. an
        # add_param_group between steps): O(#groups) per step, not O(#params).
        sig = (id(opt), len(opt.param_groups), sum(len(g["params"]) for g in opt.param_groups))
        if self._group_cache is None or self._group_cache[0] != sig:
            groups = {}
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in self._pos:
                        groups[self._pos[id(p)]] = g
            self._group_cache = (sig, groups)
        groups = self._group_cache[1]

        def lr_of(pos: int) -> float:
            try:
                return float(groups[pos]["lr"])
            except KeyError:
                raise ValueError(f"parameter {self._names[pos]!r} is decaying but not in the optimizer") from None

        return lr_of

    # ------------------------------------------------------------------ tables
    def _rebuild_all(self) -> None:
        self._quantiles = torch.tensor(list(QUANTILES.values()), dtype=torch.float64, device=self._device)
        self._family_params: dict[Hashable, frozenset[int]] = {}
        self._masks: dict[int, torch.Tensor] = {}
        touched: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for key, st in self._status.items():
            if st == PRUNED and key in self._targets:
                for s in self._masked_slices(self._targets[key]):
                    touched.setdefault(self._position(s.param), []).append((s.dim, s.indices))
        for pos, slices in touched.items():
            self._masks[pos] = element_mask(self._params[pos], slices)
        self._D_keys: list[Hashable] = []
        self._rebuild_registered()
        self._rebuild_decay_table([], keep=[k for k, st in self._status.items() if st == DECAYING])
        self._decaying_mask_cache.clear()

    def _rebuild_registered(self) -> None:
        """The table of every known target (C_len families), rebuilt when the set changes."""
        self._family_params = {}
        for t in self._targets.values():
            self._family_params.setdefault(t.family, frozenset(self._position(s.param) for s in t.producers))
        # Rows in status order, the order a checkpoint restores: after bind() + register() the
        # descriptions' own order can differ from it, and C_len's family sums follow the rows.
        rows = [self._targets[k] for k in self._status if k in self._targets] if self.rectify is not None else []
        self._R_keys = [t.key for t in rows]
        self._R_row = {k: i for i, k in enumerate(self._R_keys)}
        fam_ids: dict[Hashable, int] = {}
        fam = [fam_ids.setdefault(t.family, len(fam_ids)) for t in rows]
        self._num_families = len(fam_ids)
        dev = self._device
        self._R_family = torch.tensor(fam, dtype=torch.long, device=dev)
        self._R_counted = torch.tensor([self._status[k] != PRUNED for k in self._R_keys], dtype=torch.bool, device=dev)
        self._R_plan: Plan = build_plan(rows, self._position, dev)
        if self._pre is not None and self.rectify is not None:
            # Registered mid-step (inside a custom optimizer): their gradients are still at hand.
            self._pre["gg"] = self._grad_sq(self._pre["grads"])
        if getattr(self, "_D_keys", None):
            self._D_to_R = torch.tensor([self._R_row.get(k, 0) for k in self._D_keys], dtype=torch.long, device=dev)

    def _rebuild_decay_table(self, new: list[Hashable], keep: list[Hashable] | None = None) -> None:
        """Compact the decay table to the decaying targets and append ``new`` ones."""
        old_keys = getattr(self, "_D_keys", [])
        old_row = {k: i for i, k in enumerate(old_keys)}
        if keep is None:
            # A re-admitted key goes to the end like any new one, never back to the stale row of
            # its earlier decay: the order must not depend on when the table was last compacted
            # (a resumed run starts compacted), or releases in one step come out in another order.
            fresh = set(new)
            keep = [k for k in old_keys if self._status.get(k) == DECAYING and k not in fresh]
        keys = keep + [k for k in new if k not in set(keep)]
        dev = self._device
        self._D_keys = keys
        self._D_row = {k: i for i, k in enumerate(keys)}
        rows = [self._targets[k] for k in keys]
        info = [self._decay[k] for k in keys]
        self._D_L0 = torch.tensor([i[0] for i in info], dtype=torch.float64, device=dev)
        self._D_N = torch.tensor([float(i[1]) for i in info], dtype=torch.float64, device=dev)
        self._D_first = torch.tensor([i[2] for i in info], dtype=torch.long, device=dev)
        self._D_active = torch.ones(len(keys), dtype=torch.bool, device=dev)
        self._D_plan = build_plan(rows, self._position, dev)
        self._D_full_plan = (
            build_plan(rows, self._position, dev, consumers=True) if self.include_consumers else self._D_plan
        )
        self._D_to_R = torch.tensor([self._R_row.get(k, 0) for k in keys], dtype=torch.long, device=dev)
        self._D_track_keys = [k for k in keys if k in self._tracked]
        self._D_track_rows = torch.tensor([self._D_row[k] for k in self._D_track_keys], dtype=torch.long, device=dev)
        if self._pre is not None and all(k in old_row for k in keep):
            # Admitted mid-step: carry the kept rows' pre-update stats; new rows are not checked
            # this step (their first decay step is the next one), so zeros are placeholders.
            idx = torch.tensor([old_row[k] for k in keep], dtype=torch.long, device=dev)
            pad = torch.zeros(len(keys) - len(keep), dtype=torch.float64, device=dev)
            for name in ("xx", "gx"):
                v = self._pre[name]
                if v is not None:
                    self._pre[name] = torch.cat([v.index_select(0, idx), pad])
        elif self._pre is not None:
            self._pre = None  # table rebuilt from scratch mid-step: no check this step

    # ------------------------------------------------------------------ queries
    def start_round(self) -> None:
        """Begin a new selection round (DepGraph: a pruning round; Gate Decorator: a tick).

        Released targets stay excluded from candidates for ``release_cooldown`` rounds.
        """
        self._round += 1

    @property
    def round(self) -> int:
        """The current selection round (0 before the first ``start_round``)."""
        return self._round

    @property
    def iteration(self) -> int:
        """Optimizer steps completed under this controller."""
        return self._step

    def candidates_excluded(self) -> frozenset:
        """Keys the base method must not select: decaying, pruned and cooling-down released."""
        return frozenset(
            k for k, st in self._status.items() if st in (DECAYING, PRUNED) or (st == RELEASED and self._cooling(k))
        )

    def status(self, key: Hashable) -> str | None:
        """``registered`` | ``decaying`` | ``pruned`` | ``released``, or None if unknown."""
        return self._status.get(key)

    def is_decaying(self, key: Hashable) -> bool:
        """Whether the target ``key`` is in the decay set D."""
        return self._status.get(key) == DECAYING

    def _keys(self, status: str) -> frozenset:
        return frozenset(k for k, st in self._status.items() if st == status)

    @property
    def decaying(self) -> frozenset:
        """Keys of the targets currently decaying."""
        return self._keys(DECAYING)

    @property
    def pruned(self) -> frozenset:
        """Keys of the targets decayed to zero (kept at zero until removed and ``forget``-ed)."""
        return self._keys(PRUNED)

    @property
    def released(self) -> frozenset:
        """Keys of the targets released by Self-Rectifying (and not re-admitted since)."""
        return self._keys(RELEASED)

    def target(self, key: Hashable) -> Target:
        """The stored description of target ``key``."""
        return self._targets[key]

    def counts(self) -> dict[str, int]:
        """Sizes of the target sets, plus cumulative releases and re-admissions."""
        return {
            "decaying": self._num[DECAYING],
            "pruned": self._num[PRUNED],
            "released": self._num[RELEASED],
            "releases_total": len(self.log.releases),
            "readmissions": len(self.log.readmissions),
        }

    def decay_progress(self, key: Hashable) -> tuple[int, int] | None:
        """``(n, N)`` for a decaying target: decay steps applied so far and its length."""
        if self._status.get(key) != DECAYING:
            return None
        _, N, first = self._decay[key]
        done = 1 + max(0, (self._step - first + self.interval - 1) // self.interval)
        return min(done, N), N

    def decaying_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Boolean mask (param's shape): elements in slices of decaying targets.

        What OTOv2 excludes from its own half-space projection. Cached until the decay set changes.
        """
        pos = self._position(param)
        mask = self._decaying_mask_cache.get(pos)
        if mask is None:
            slices = [
                (s.dim, s.indices)
                for k in self._D_keys
                if self._status[k] == DECAYING
                for s in self._masked_slices(self._targets[k])
                if s.param is param
            ]
            mask = element_mask(param, slices)
            self._decaying_mask_cache[pos] = mask
        return mask

    def pruned_mask(self, param: torch.Tensor) -> torch.Tensor:
        """Boolean mask (param's shape): elements held at zero for pruned targets."""
        pos = self._position(param)
        mask = self._masks.get(pos)
        return mask.clone() if mask is not None else torch.zeros(param.shape, dtype=torch.bool, device=param.device)

    def forget(self, keys: Iterable[Hashable] | None = None) -> None:
        """Drop targets from the controller (default: every pruned one).

        Call after the base method removed pruned structures physically; then ``bind`` the new
        parameters. A forgotten decaying target simply stops decaying (no release is logged).
        """
        keys = list(self.pruned if keys is None else keys)
        for key in keys:
            st = self._status.pop(key, None)
            if st is None:
                continue
            if st in self._num:
                self._num[st] -= 1
            self._targets.pop(key, None)
            self._decay.pop(key, None)
            self._released_round.pop(key, None)
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
        st_of = self._status.get
        targets = []
        for key, st in self._status.items():
            t = self._targets.get(key)
            targets.append(
                {
                    "key": key,
                    "status": st,
                    "family": None if t is None else t.family,
                    "slices": None
                    if t is None
                    else [(self._names[self._position(s.param)], s.dim, list(s.indices), s.consumer) for s in t.slices],
                    "decay": self._decay.get(key),
                    "released_round": self._released_round.get(key),
                }
            )
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "step": self._step,
            "round": self._round,
            "targets": targets,
            # The decaying rows only: stale (released / pruned) rows wait for the next compaction.
            "decay_order": [k for k in self._D_keys if st_of(k) == DECAYING],
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
        targets: dict[Hashable, Target] = {}
        status: dict[Hashable, str] = {}
        decay, released_round = {}, {}
        for rec in state["targets"]:
            key = rec["key"]
            status[key] = rec["status"]
            if rec["slices"] is not None:
                slices = []
                for name, dim, idx, consumer in rec["slices"]:
                    if name not in self._by_name:
                        raise ValueError(f"checkpoint target {key!r} slices unknown parameter {name!r}")
                    slices.append(Slice(self._params[self._by_name[name]], dim, tuple(idx), consumer))
                targets[key] = Target(key, rec["family"], tuple(slices))
            if rec["decay"] is not None:
                L0, N, first = rec["decay"]
                decay[key] = (float(L0), int(N), int(first))
            if rec["released_round"] is not None:
                released_round[key] = int(rec["released_round"])
        self._targets, self._status = targets, status
        self._decay, self._released_round = decay, released_round
        self._prune_at = {int(k): list(v) for k, v in state["prune_at"]}
        self._tracked = dict.fromkeys(state["tracked"])
        self._step, self._round = int(state["step"]), int(state["round"])
        self._num = {s: sum(1 for v in status.values() if v == s) for s in (DECAYING, PRUNED, RELEASED)}
        self._in_step, self._pre = False, None
        self.log.load_state_dict(state["log"])
        self._D_keys = []
        self._rebuild_all()
        # Same row order as the saved table, so segment sums accumulate identically.
        order = [k for k in state["decay_order"] if status.get(k) == DECAYING]
        rest = [k for k, st in status.items() if st == DECAYING and k not in set(order)]
        self._D_keys = []
        self._rebuild_decay_table([], keep=order + rest)
