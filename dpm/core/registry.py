"""The target registry: every target the controller knows and where it is in its life.

A target is *registered* (a family member C_len counts, not decaying), *decaying* (admitted: its
norm goes to zero over N decay steps), *pruned* (decayed to zero, held there) or *released*
(Self-Rectifying let it go; excluded from the base method's candidates for a cooldown, then
admissible again). The registry holds the descriptions, this status machine and the per-target
records of a checkpoint; the controller holds the tensors (:mod:`dpm.core.tables`).
"""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Mapping

from .params import ParamIndex
from .tables import DecayInfo
from .targets import Slice, Target

__all__ = ["TargetRegistry", "REGISTERED", "DECAYING", "PRUNED", "RELEASED"]

REGISTERED, DECAYING, PRUNED, RELEASED = "registered", "decaying", "pruned", "released"


class TargetRegistry:
    """The known targets, their status, decay records and release rounds.

    Args:
        index: the controller's parameters (targets must slice them; checkpoints name them).
        cooldown: rounds a released target stays excluded (``release_cooldown``; 1 without SR).
    """

    def __init__(self, index: ParamIndex, cooldown: int) -> None:
        self.index = index
        self.cooldown = cooldown
        self.targets: dict[Hashable, Target] = {}
        self.status: dict[Hashable, str] = {}  # every known key, in the order it became known
        self.decay: dict[Hashable, DecayInfo] = {}  # decaying keys -> (L0, N, first decay step)
        self.released_round: dict[Hashable, int] = {}
        self.num = {DECAYING: 0, PRUNED: 0, RELEASED: 0}
        self.round = 0

    # ------------------------------------------------------------------ queries
    def keys(self, status: str) -> frozenset:
        """Keys of the targets with this status."""
        return frozenset(k for k, st in self.status.items() if st == status)

    def cooling(self, key: Hashable) -> bool:
        """Whether ``key`` is released and still in its cooldown."""
        if self.status.get(key) != RELEASED:
            return False
        return self.round < self.released_round[key] + self.cooldown

    def row_positions(self) -> set[int]:
        """Positions of the parameters the targets slice along dim 0 (what a RowPack packs)."""
        position = self.index.position
        return {position(s.param) for t in self.targets.values() for s in t.producers if s.dim == 0}

    def excluded(self) -> frozenset:
        """Keys the base method must not select: decaying, pruned and cooling-down released."""
        return frozenset(
            k for k, st in self.status.items() if st in (DECAYING, PRUNED) or (st == RELEASED and self.cooling(k))
        )

    # ------------------------------------------------------------------ checks
    def check_new(self, targets: list[Target], admitting: bool) -> None:
        """Refuse what ``register`` / ``admit`` (``admitting``) must not accept, before any change."""
        seen: set = set()
        for t in targets:
            if not isinstance(t, Target):
                raise TypeError(f"expected Target, got {type(t).__name__}")
            if t.key in seen:
                raise ValueError(f"target key {t.key!r} appears twice")
            seen.add(t.key)
            for s in t.slices:
                self.index.position(s.param)
            st = self.status.get(t.key)
            old = self.targets.get(t.key)
            if st in (DECAYING, PRUNED):
                if admitting:
                    raise ValueError(f"target {t.key!r} is already {st}; it cannot be admitted again")
                if old is not None and not old.same_as(t):
                    raise ValueError(f"target {t.key!r} is {st}: its slices cannot change")
            if admitting and st == RELEASED and self.cooling(t.key):
                raise ValueError(
                    f"target {t.key!r} was released in round {self.released_round[t.key]} and is "
                    f"excluded for {self.cooldown} round(s): select candidates outside candidates_excluded()"
                )
        # Families never mix layers: every member slices the same producer parameters.
        incoming = {t.key for t in targets}
        fams: dict[Hashable, tuple[Hashable, frozenset[int]]] = {}
        members = [u for k, u in self.targets.items() if k not in incoming] + targets
        for t in members:
            ps = frozenset(self.index.position(s.param) for s in t.producers)
            ref_key, ref = fams.setdefault(t.family, (t.key, ps))
            if ref != ps:
                raise ValueError(
                    f"family {t.family!r} mixes layers: target {t.key!r} slices parameters "
                    f"{sorted(self.index.names[i] for i in ps)}, member {ref_key!r} "
                    f"{sorted(self.index.names[i] for i in ref)}"
                )

    def check_overlap(self, targets: list[Target]) -> None:
        """Refuse targets whose producer elements a decaying or pruned target (or another of them) holds."""
        # Producer elements belong to at most one decaying/pruned target, or the norm each one is
        # projected to would be undefined. Checked at admission only (never per step).
        owned: dict[int, tuple[int, set[int]]] = {}

        def claim(t: Target) -> None:
            for s in t.producers:
                pos = self.index.position(s.param)
                dim, idx = owned.setdefault(pos, (s.dim, set()))
                if dim != s.dim or idx.intersection(s.indices):
                    raise ValueError(
                        f"target {t.key!r} overlaps the producer slices of another decaying or "
                        f"pruned target on parameter {self.index.names[pos]!r}"
                    )
                idx.update(s.indices)

        for key, st in self.status.items():
            if st in (DECAYING, PRUNED) and key in self.targets:
                claim(self.targets[key])
        for t in targets:
            claim(t)

    # ------------------------------------------------------------------ transitions
    def describe(self, targets: list[Target]) -> bool:
        """Store new or changed descriptions (not of decaying / pruned targets, whose slices are
        fixed); a new key becomes registered. Whether anything changed."""
        changed = False
        for t in targets:
            old = self.targets.get(t.key)
            if old is not None and old.same_as(t):
                continue
            if self.status.get(t.key) in (DECAYING, PRUNED):
                continue
            self.targets[t.key] = t
            self.status.setdefault(t.key, REGISTERED)
            changed = True
        return changed

    def start_decay(self, key: Hashable, info: DecayInfo) -> bool:
        """``key`` is decaying from now; whether it is a re-admission of a released target."""
        readmitted = self.status[key] == RELEASED
        if readmitted:
            self.num[RELEASED] -= 1
        self.released_round.pop(key, None)
        self.decay[key] = info
        self.status[key] = DECAYING
        self.num[DECAYING] += 1
        return readmitted

    def release(self, keys: list[Hashable]) -> None:
        """Decaying ``keys`` are released in the current round."""
        for key in keys:
            self.status[key] = RELEASED
            self.released_round[key] = self.round
            self.decay.pop(key, None)
            self.num[DECAYING] -= 1
            self.num[RELEASED] += 1

    def prune(self, keys: list[Hashable]) -> None:
        """Decaying ``keys`` reached zero."""
        for key in keys:
            self.status[key] = PRUNED
            self.num[DECAYING] -= 1
            self.num[PRUNED] += 1

    def forget(self, keys: Iterable[Hashable]) -> None:
        """Drop ``keys`` (unknown ones are ignored)."""
        for key in keys:
            st = self.status.pop(key, None)
            if st is None:
                continue
            if st in self.num:
                self.num[st] -= 1
            self.targets.pop(key, None)
            self.decay.pop(key, None)
            self.released_round.pop(key, None)

    def drop_unbound(self) -> None:
        """After the index was re-bound: drop the descriptions of targets off its parameters.

        Registered ones are forgotten; released ones keep their cooldown but lose their
        description. A ValueError, before any change, for a decaying or pruned one (their slices
        must stay).
        """
        unbound = [key for key, t in self.targets.items() if not self.index.holds(t)]
        for key in unbound:
            st = self.status[key]
            if st in (DECAYING, PRUNED):
                raise ValueError(
                    f"bind(): {st} target {key!r} slices a parameter that is not in the new set; "
                    "forget() it first or wait until its decay ends"
                )
        for key in unbound:
            del self.targets[key]
            if self.status[key] == REGISTERED:
                del self.status[key]

    # ------------------------------------------------------------------ checkpoints
    def records(self) -> list[dict[str, Any]]:
        """One plain record per known target, in status order (slices by parameter name)."""
        out = []
        for key, st in self.status.items():
            t = self.targets.get(key)
            out.append(
                {
                    "key": key,
                    "status": st,
                    "family": None if t is None else t.family,
                    "slices": None
                    if t is None
                    else [
                        (self.index.names[self.index.position(s.param)], s.dim, list(s.indices), s.consumer)
                        for s in t.slices
                    ],
                    "decay": self.decay.get(key),
                    "released_round": self.released_round.get(key),
                }
            )
        return out

    def load_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace every target by the :meth:`records` of a checkpoint."""
        targets: dict[Hashable, Target] = {}
        status: dict[Hashable, str] = {}
        decay, released_round = {}, {}
        for rec in records:
            key = rec["key"]
            status[key] = rec["status"]
            if rec["slices"] is not None:
                slices = []
                for name, dim, idx, consumer in rec["slices"]:
                    if name not in self.index.by_name:
                        raise ValueError(f"checkpoint target {key!r} slices unknown parameter {name!r}")
                    slices.append(Slice(self.index.params[self.index.by_name[name]], dim, tuple(idx), consumer))
                targets[key] = Target(key, rec["family"], tuple(slices))
            if rec["decay"] is not None:
                L0, N, first = rec["decay"]
                decay[key] = (float(L0), int(N), int(first))
            if rec["released_round"] is not None:
                released_round[key] = int(rec["released_round"])
        self.targets, self.status = targets, status
        self.decay, self.released_round = decay, released_round
        self.num = {s: sum(1 for v in status.values() if v == s) for s in (DECAYING, PRUNED, RELEASED)}
