"""Segment plans: the vectorised machinery behind every per-step quantity.

A *plan* is built once when a target set changes. It lists the (parameter, dim) pairs the targets
slice along and, over the concatenation of one vector per pair (of length ``shape[dim]``), two
index tensors: ``sel`` (positions in that concatenation) and ``seg`` (the target row of each).
A per-step quantity then costs one or two tensor ops per parameter plus a constant number of
global ops, whatever the number of targets:

* segment sums (norms, dot products): a row-wise dot product per (param, dim) pair (per group of
  same-shaped pairs off the CPU), one ``cat``, one ``index_select`` of ``sel`` and one
  ``index_add_`` into ``seg``;
* rescaling: scatter the per-target factors into one vector of ones (``index_copy_``, or
  ``index_reduce_('prod')`` where an index repeats, so an element in several targets gets the
  product of their factors), ``split`` it per pair and multiply each parameter by its broadcast
  (one ``_foreach_mul_`` call).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .targets import Target

__all__ = ["Plan", "build_plan", "rowdot", "segment_sum", "apply_factors", "element_mask",
           "STACK_ON_CPU"]

#: Stack same-shaped tensors into one op per group on CPU too. Off by default: on CPU the stacked
#: copies are fresh multi-MB allocations (page faults every step) and cost more than the per-tensor
#: dispatch they save; on accelerators (caching allocator, launch-bound) stacking is the win.
STACK_ON_CPU = False


@dataclass
class Plan:
    """Where the slices of a table of targets sit.

    Attributes:
        entries: ``(pos, dim)`` per (parameter, dim) pair, ``pos`` = registry position, sorted.
        sizes: ``shape[dim]`` per entry (the length of its vector in the concatenation).
        sel: positions in the concatenation covered by some slice.
        seg: the target row of each ``sel``.
        unique: no position of ``sel`` repeats (every element in at most one row).
        num_rows: number of target rows.
        groups: ``(start, end, dim, shape)``: entries[start:end] share shape, dim and dtype.
    """

    entries: list[tuple[int, int]]
    sizes: list[int]
    sel: torch.Tensor
    seg: torch.Tensor
    unique: bool
    num_rows: int
    groups: list[tuple[int, int, int, tuple]] = field(default_factory=list)
    sizes_t: torch.Tensor | None = None
    _weights: tuple[list[float], torch.Tensor] | None = None

    def __bool__(self) -> bool:
        return bool(self.entries)


def build_plan(
    rows: Sequence[Target],
    position: Callable[[torch.Tensor], int],
    device: torch.device,
    consumers: bool = False,
) -> Plan:
    """Plan over the producer slices of ``rows`` (plus consumer slices when ``consumers``).

    Off the CPU, entries of the same shape, dim and dtype are grouped (one stacked op per group
    instead of one per parameter: ResNet-56's 171 conv/BN tensors come in about a dozen shapes).
    The order is a pure function of the rows and the device, so two plans built from the same rows
    accumulate in the same order (a resumed run reproduces sums bitwise).
    """
    acc: dict[tuple[int, int], tuple[int, tuple, list[int], list[int]]] = {}
    for r, t in enumerate(rows):
        for s in t.slices:
            if s.consumer and not consumers:
                continue
            key = (position(s.param), s.dim)
            entry = acc.get(key)
            if entry is None:  # tensor metadata once per (param, dim), not per slice
                size = s.param.shape[s.dim] if s.param.dim() > 0 else 1
                kind = (tuple(s.param.shape), s.dim, s.param.dtype)
                entry = acc[key] = (size, kind, [], [])
            sel, seg = entry[2], entry[3]
            sel.extend(s.indices)
            seg.extend([r] * len(s.indices))
    stack = torch.device(device).type != "cpu" or STACK_ON_CPU
    by_kind: dict[tuple, list[tuple[int, int]]] = {}
    for key in sorted(acc):
        # Without stacking every entry is its own group (the kind made unique by its key).
        by_kind.setdefault(acc[key][1] if stack else acc[key][1] + key, []).append(key)
    entries, sizes, groups, all_sel, all_seg = [], [], [], [], []
    offset = 0
    for (shape, dim, *_), keys in by_kind.items():
        groups.append((len(entries), len(entries) + len(keys), dim, shape))
        for key in keys:
            size, _, sel, seg = acc[key]
            entries.append(key)
            sizes.append(size)
            all_sel.extend(offset + i for i in sel)
            all_seg.extend(seg)
            offset += size
    return Plan(
        entries=entries,
        sizes=sizes,
        sel=torch.tensor(all_sel, dtype=torch.long, device=device),
        seg=torch.tensor(all_seg, dtype=torch.long, device=device),
        unique=len(set(all_sel)) == len(all_sel),
        num_rows=len(rows),
        groups=groups,
        sizes_t=torch.tensor(sizes, dtype=torch.long, device=device),
    )


def rowdot(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum`` of ``a * b`` over every dim but ``dim``: one vector of length ``shape[dim]``."""
    if a.dim() <= 1:
        return (a * b).reshape(-1)
    if dim != 0:
        a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    n = a.shape[0]
    return torch.linalg.vecdot(a.reshape(n, -1), b.reshape(n, -1))


def _stacked_rowdot(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    # a, b: (G, *shape) stacks of same-shaped tensors; the row sums of each, concatenated.
    if a.dim() <= 2:
        return (a * b).reshape(-1)
    if dim != 0:
        a, b = a.movedim(dim + 1, 1), b.movedim(dim + 1, 1)
    g, n = a.shape[0], a.shape[1]
    return torch.linalg.vecdot(a.reshape(g, n, -1), b.reshape(g, n, -1)).reshape(-1)


def segment_sum(
    plan: Plan,
    pair: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None],
    dtype: torch.dtype,
    device: torch.device,
    weights: Callable[[int], float] | None = None,
) -> torch.Tensor:
    """Per-row sums of ``a * b`` over the planned slices (``a is b``: squared norms).

    ``pair(pos)`` returns ``(a, b)`` for the parameter at registry position ``pos``, or None when
    it contributes nothing (e.g. no gradient). ``weights(pos)``, when given, scales a parameter's
    contribution (the per-parameter learning rate of the radial C_rate).
    """
    out = torch.zeros(plan.num_rows, dtype=dtype, device=device)
    if not plan:
        return out
    parts = []
    for start, end, dim, shape in plan.groups:
        pairs = [pair(pos) for pos, _ in plan.entries[start:end]]
        if any(ab is None for ab in pairs):
            zero = torch.zeros(shape, dtype=torch.float32, device=device)
            pairs = [(zero, zero) if ab is None else ab for ab in pairs]
        if len(pairs) == 1:
            a, b = pairs[0]
            if a.dtype not in (torch.float32, torch.float64):
                a, b = a.float(), b.float()
            parts.append(rowdot(a, b, dim))
            continue
        same = all(a is b for a, b in pairs)
        A = torch.stack([a for a, _ in pairs])
        B = A if same else torch.stack([b for _, b in pairs])
        if A.dtype not in (torch.float32, torch.float64):
            A, B = A.float(), B.float()
        parts.append(_stacked_rowdot(A, B, dim))
    flat = torch.cat(parts).to(dtype)
    if weights is not None:
        scale = [weights(pos) for pos, _ in plan.entries]
        # Learning rates rarely change: reuse the expanded vector (no host->device copy per step).
        if plan._weights is None or plan._weights[0] != scale:
            w = torch.tensor(scale, dtype=dtype, device=device)
            plan._weights = (scale, torch.repeat_interleave(w, plan.sizes_t, output_size=flat.numel()))
        flat = flat * plan._weights[1]
    return out.index_add_(0, plan.seg, flat.index_select(0, plan.sel))


def apply_factors(
    plan: Plan,
    factors: torch.Tensor,
    tensor: Callable[[int], torch.Tensor],
) -> None:
    """Multiply every planned slice by its row's factor, in place (one multiply per parameter).

    An element covered by several rows (only possible with consumer slices) gets the product of
    their factors; elements covered by no row are multiplied by exactly 1.
    """
    if not plan:
        return
    # float32 factors unless a planned tensor is float64 (the factor is cast to the parameter's
    # dtype by the in-place multiply either way).
    wide = any(tensor(pos).dtype == torch.float64 for pos, _ in plan.entries)
    dtype = torch.float64 if wide else torch.float32
    full = torch.ones(sum(plan.sizes), dtype=dtype, device=factors.device)
    vals = factors.index_select(0, plan.seg).to(dtype)
    if plan.unique:
        full.index_copy_(0, plan.sel, vals)
    else:
        with warnings.catch_warnings():  # index_reduce_ is flagged beta; its semantics are fixed
            warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)
            full.index_reduce_(0, plan.sel, vals, "prod")
    pieces = full.split(plan.sizes)
    scales: dict[int, torch.Tensor] = {}
    for (pos, dim), piece in zip(plan.entries, pieces):
        t = tensor(pos)
        shape = [1] * t.dim()
        if shape:
            shape[dim] = -1
        vec = piece.view(shape) if shape else piece.reshape(())
        scales[pos] = vec if pos not in scales else scales[pos] * vec
    # One call for all parameters (per-tensor kernels underneath: the scales broadcast).
    torch._foreach_mul_([tensor(pos) for pos in scales], list(scales.values()))


def element_mask(
    param: torch.Tensor, slices: Sequence[tuple[int, Sequence[int]]]
) -> torch.Tensor:
    """Boolean mask of ``param``'s shape, True on the union of (dim, indices) slices."""
    mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    by_dim: dict[int, list[int]] = {}
    for dim, idx in slices:
        by_dim.setdefault(dim, []).extend(idx)
    for dim, idx in by_dim.items():
        if param.dim() == 0:
            mask.fill_(True)
            continue
        index = torch.tensor(sorted(set(idx)), dtype=torch.long, device=param.device)
        mask.index_fill_(dim, index, True)
    return mask
