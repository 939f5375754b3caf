"""The controller's two target tables: one row per target, its per-target quantities as tensors.

* :class:`FamilyTable` -- every known target (Self-Rectifying's C_len compares a decaying target's
  gradient with the mean over its family);
* :class:`DecayTable` -- the decaying targets (their L0, N, first decay step, and the plans the
  per-step norms and factors run on).

Both are rebuilt (never edited row by row) when their target set changes, so a decay step is a
fixed number of tensor ops over all rows (:mod:`dpm.core.segments`). Rows that leave a set between
rebuilds are switched off in place (``counted`` / ``active``) and dropped at the next rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Container, Hashable, Mapping, Sequence

import torch

from .segments import Plan, build_plan
from .targets import Target

__all__ = ["FamilyTable", "DecayTable", "DecayInfo"]

#: Per decaying target: (L0 = ||x|| at admission, N = its decay length, first = the optimizer step
#: that applies its decay step 2).
DecayInfo = tuple[float, int, int]
Position = Callable[[torch.Tensor], int]


def _rows_tensor(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


@dataclass
class FamilyTable:
    """Self-Rectifying's C_len table: one row per known target.

    Attributes:
        keys: the target of each row.
        row: ``key -> row``.
        family: family id (0..num_families-1) per row (long).
        counted: whether the row enters its family's mean gradient (bool): every target but the
            pruned ones.
        num_families: number of family ids.
        plan: the rows' producer slices (gradient norms per row).
    """

    keys: list[Hashable]
    row: dict[Hashable, int]
    family: torch.Tensor
    counted: torch.Tensor
    num_families: int
    plan: Plan

    @classmethod
    def build(
        cls, rows: Sequence[Target], pruned: Container[Hashable], position: Position, device: torch.device
    ) -> FamilyTable:
        """The table of ``rows`` in their order (C_len's family sums follow the rows)."""
        keys = [t.key for t in rows]
        fam_ids: dict[Hashable, int] = {}
        fam = [fam_ids.setdefault(t.family, len(fam_ids)) for t in rows]
        return cls(
            keys=keys,
            row={k: i for i, k in enumerate(keys)},
            family=torch.tensor(fam, dtype=torch.long, device=device),
            counted=torch.tensor([k not in pruned for k in keys], dtype=torch.bool, device=device),
            num_families=len(fam_ids),
            plan=build_plan(rows, position, device),
        )

    @classmethod
    def empty(cls, device: torch.device) -> FamilyTable:
        """A table without rows (Self-Rectifying off, or nothing known yet)."""
        return cls.build([], (), _no_position, device)

    def rows_of(self, keys: Sequence[Hashable]) -> torch.Tensor:
        """The row of each key (long tensor); 0 for a key not in the table (Self-Rectifying off:
        the row is never read)."""
        return _rows_tensor([self.row.get(k, 0) for k in keys], self.family.device)

    def uncount(self, keys: Sequence[Hashable]) -> None:
        """Take the rows of ``keys`` (those in the table) out of their families' means (pruned)."""
        rows = [self.row[k] for k in keys if k in self.row]
        if rows:
            self.counted[_rows_tensor(rows, self.counted.device)] = False


@dataclass
class DecayTable:
    """The decaying targets: one row per target, in admission order (compacted at each rebuild).

    Attributes:
        keys: the target of each row.
        row: ``key -> row``.
        L0, N: float64 per row (N as a float for the schedule).
        first: the optimizer step of decay step 2 per row (long).
        active: rows still decaying (bool); released and pruned rows are switched off until the
            next rebuild drops them.
        plan: the rows' producer slices (norms, and the factors without ``include_consumers``).
        full_plan: the slices the factors apply to (``plan``, plus consumer slices under
            ``include_consumers``).
        to_family: each row's row in the :class:`FamilyTable` (long).
        track_keys: the rows whose norm trajectory is logged, and their ``track_rows``.
    """

    keys: list[Hashable]
    row: dict[Hashable, int]
    L0: torch.Tensor
    N: torch.Tensor
    first: torch.Tensor
    active: torch.Tensor
    plan: Plan
    full_plan: Plan
    to_family: torch.Tensor
    track_keys: list[Hashable]
    track_rows: torch.Tensor

    @classmethod
    def build(
        cls,
        keys: list[Hashable],
        targets: Mapping[Hashable, Target],
        decay: Mapping[Hashable, DecayInfo],
        *,
        families: FamilyTable,
        tracked: Container[Hashable],
        position: Position,
        device: torch.device,
        consumers: bool,
    ) -> DecayTable:
        """The table of ``keys`` in this order (segment sums accumulate in row order)."""
        row = {k: i for i, k in enumerate(keys)}
        rows = [targets[k] for k in keys]
        info = [decay[k] for k in keys]
        plan = build_plan(rows, position, device)
        track_keys = [k for k in keys if k in tracked]
        return cls(
            keys=keys,
            row=row,
            L0=torch.tensor([i[0] for i in info], dtype=torch.float64, device=device),
            N=torch.tensor([float(i[1]) for i in info], dtype=torch.float64, device=device),
            first=torch.tensor([i[2] for i in info], dtype=torch.long, device=device),
            active=torch.ones(len(keys), dtype=torch.bool, device=device),
            plan=plan,
            full_plan=build_plan(rows, position, device, consumers=True) if consumers else plan,
            to_family=families.rows_of(keys),
            track_keys=track_keys,
            track_rows=_rows_tensor([row[k] for k in track_keys], device),
        )

    @classmethod
    def empty(cls, device: torch.device) -> DecayTable:
        """A table without rows."""
        families = FamilyTable.empty(device)
        return cls.build(
            [], {}, {}, families=families, tracked=(), position=_no_position, device=device, consumers=False
        )

    def deactivate(self, keys: Sequence[Hashable]) -> None:
        """Switch off the rows of ``keys`` (those in the table): released or pruned."""
        rows = [self.row[k] for k in keys if k in self.row]
        if rows:
            self.active[_rows_tensor(rows, self.active.device)] = False

    def link(self, families: FamilyTable) -> None:
        """Point ``to_family`` at a rebuilt family table."""
        self.to_family = families.rows_of(self.keys)


def _no_position(param: torch.Tensor) -> int:
    raise AssertionError("an empty table has no slices")  # pragma: no cover
