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

On CPU, parameters packed by a :class:`~dpm.core.packing.RowPack` are read and scaled in their
buffers: one op per shape group and no copy (``pack=`` of the functions below).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .packing import PackGroup, RowPack, is_channels_last, rows_of
from .targets import Target

__all__ = [
    "Plan",
    "build_plan",
    "rowdot",
    "segment_sum",
    "pre_step_sums",
    "apply_factors",
    "element_mask",
    "STACK_ON_CPU",
    "ROW_GROUPS_ON_CPU",
]

#: Stack same-shaped tensors into one op per group on CPU too. Off by default: on CPU the stacked
#: copies are fresh multi-MB allocations (page faults every step) and cost more than the per-tensor
#: dispatch they save; on accelerators (caching allocator, launch-bound) stacking is the win.
STACK_ON_CPU = False
#: On CPU, row sums of same-shaped tensors in one op per shape group (bit for bit the per-tensor
#: sums, see _RowLayout); False keeps one op per tensor (tests compare the two).
ROW_GROUPS_ON_CPU = True


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
    _weights_sel: tuple[list[float], torch.Tensor] | None = None
    _weights_sub: tuple[list[float], torch.Tensor] | None = None
    _sub: "tuple[_RowLayout, tuple[torch.Tensor, torch.Tensor]] | None" = None  # pre_step_sums' row map
    _rows: "_RowLayout | None | bool" = None  # False: the plan has no row layout (see _row_layout)
    _packed: "tuple[RowPack, _RowLayout | bool] | None" = None  # its layout over a pack (or False)
    # apply_factors' kept buffer: (tensors it was built for, ones buffer, tensors, scale views).
    _scales: tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None = None

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
    """``sum`` of ``a * b`` over every dim but ``dim``: one vector of length ``shape[dim]``.

    The rows of a channels_last ``a`` are summed in its memory order, (H, W, I), as the grouped
    path sums them (:class:`_RowLayout`), so both give the same bits."""
    if a.dim() <= 1:
        return (a * b).reshape(-1)
    if dim == 0 and is_channels_last(a):
        a, b = rows_of(a, True), rows_of(b, True)
    elif dim != 0:
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


@dataclass
class _RowLayout:
    """The CPU fast path of a plan (one op per group instead of several per parameter).

    Entries along dim 0 whose tensors share their trailing shape are one group: ``torch.cat`` of
    the group's tensors along dim 0 gives their rows one under the other, and one ``vecdot`` over
    the (rows, K) matrix gives every row sum of the group. Each row is reduced by the same kernel
    over the same K elements in the same (logical) order as ``rowdot`` on its own tensor, so the
    sums are bit for bit those of the per-tensor path; ``perm`` then puts them in the per-tensor
    path's order (the order of ``flat``), so the selection and the float64 accumulation into rows
    are unchanged too."""

    groups: list[list[int]]  # entry indices per group, in concatenation order
    perm: torch.Tensor  # for each element of plan.sel: its row in the cat of the groups' sums
    weight_entry: torch.Tensor  # for each element of plan.sel: its entry (to look up a weight)
    nhwc: list[bool]  # per entry: a channels_last 4-d tensor, its rows read in memory order
    cat_start: list[int]  # per entry: its first row in the groups' concatenation
    buffers: dict = field(default_factory=dict)  # (group, operand) -> reused concatenation buffer
    # Over a RowPack: each group is a pack buffer (every row of it, members outside the plan
    # too), read and scaled in place; `complete`: every member of those buffers is an entry.
    packed: list[PackGroup] | None = None
    complete: bool = False


def _row_layout(plan: Plan, tensors: list[torch.Tensor]) -> "_RowLayout | None":
    """Build (once) the plan's row layout, or None where the fast path does not apply: a slice
    along another dim than 0, a tensor that is not float32, or off the CPU (stacking serves there)."""
    if plan._rows is not None:
        return plan._rows or None
    plan._rows = False
    if plan.sel.device.type != "cpu" or STACK_ON_CPU or not ROW_GROUPS_ON_CPU:
        return None
    by_shape: dict[tuple, list[int]] = {}
    nhwc = []
    for e, ((_, dim), t) in enumerate(zip(plan.entries, tensors)):
        if dim != 0 or t.dim() == 0 or t.dtype != torch.float32:
            return None
        nhwc.append(is_channels_last(t))
        by_shape.setdefault((nhwc[-1], tuple(rows_of(t, nhwc[-1]).shape[1:])), []).append(e)
    groups = list(by_shape.values())
    cat_start, at = [0] * len(plan.entries), 0
    for group in groups:
        for e in group:
            cat_start[e] = at
            at += plan.sizes[e]
    plan._rows = _layout(plan, groups, nhwc, cat_start)
    return plan._rows


def _packed_layout(plan: Plan, pack: RowPack | None, tensors: list[torch.Tensor]) -> "_RowLayout | None":
    """The plan's layout over ``pack`` (built once per pack), or None where it does not apply:
    ``tensors`` are not the packed parameters themselves, or a slice is outside the pack."""
    if not pack or plan.sel.device.type != "cpu" or STACK_ON_CPU or not ROW_GROUPS_ON_CPU:
        return None
    if any(pack.members.get(pos) is not t for (pos, _), t in zip(plan.entries, tensors)):
        return None  # not the live parameters (a trial point, gradients) or not all packed
    if plan._packed is not None and plan._packed[0] is pack:
        return plan._packed[1] or None
    plan._packed = (pack, False)
    by_group: dict[int, list[int]] = {}
    for e, ((pos, dim), size) in enumerate(zip(plan.entries, plan.sizes)):
        g, m = pack.where[pos]
        if dim != 0 or pack.groups[g].rows[m] != size:
            return None
        by_group.setdefault(g, []).append(e)
    used = sorted(by_group)
    groups = [by_group[g] for g in used]
    packed = [pack.groups[g] for g in used]
    cat_start, nhwc, base = [0] * len(plan.entries), [False] * len(plan.entries), 0
    for group, pg in zip(groups, packed):
        for e in group:
            m = pack.where[plan.entries[e][0]][1]
            cat_start[e], nhwc[e] = base + pg.start[m], pg.nhwc
        base += pg.buffer.shape[0]
    layout = _layout(plan, groups, nhwc, cat_start)
    layout.packed = packed
    layout.complete = all(len(group) == len(pg.members) for group, pg in zip(groups, packed))
    plan._packed = (pack, layout)
    return layout


def _layout(plan: Plan, groups: list[list[int]], nhwc: list[bool], cat_start: list[int]) -> _RowLayout:
    # Row r of entry e sits at flat_start[e] + r in `flat` and at cat_start[e] + r in the groups' rows.
    flat_start, offset = [], 0
    for size in plan.sizes:
        flat_start.append(offset)
        offset += size
    # CPU index maps, whatever torch's default device (explicit device= throughout dpm.core).
    flat_to_cat = torch.empty(offset, dtype=torch.long, device="cpu")
    entry_of = torch.empty(offset, dtype=torch.long, device="cpu")
    for e, size in enumerate(plan.sizes):
        rows = slice(flat_start[e], flat_start[e] + size)
        flat_to_cat[rows] = torch.arange(cat_start[e], cat_start[e] + size, device="cpu")
        entry_of[rows] = e
    sel = plan.sel.cpu()
    return _RowLayout(groups, flat_to_cat.index_select(0, sel), entry_of.index_select(0, sel), nhwc, cat_start)


def _group_rowdots(plan: Plan, layout: _RowLayout, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Every row sum of every group, groups one after the other. ``vecdot`` is a multiply and a
    row sum; done here as ``cat`` into a buffer kept with the plan, an in-place multiply and the
    same row sum, so no multi-MB temporary is allocated (and page-faulted in) every step. A packed
    group (``a is b``, the parameters) is multiplied straight from its buffer: no copy."""
    parts = []
    for i, group in enumerate(layout.groups):
        if layout.packed is not None:
            parts.append(_rowsum(layout, i, layout.packed[i].buffer, layout.packed[i].buffer))
            continue
        same = all(pairs[e][0] is pairs[e][1] for e in group)
        A = _cat_into(layout, (i, 0), [rows_of(pairs[e][0], layout.nhwc[e]) for e in group])
        if same:
            A.mul_(A)
        else:
            A.mul_(_cat_into(layout, (i, 1), [rows_of(pairs[e][1], layout.nhwc[e]) for e in group]))
        parts.append(A.view(A.shape[0], -1).sum(1) if A.dim() > 1 else A)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _rowsum(layout: _RowLayout, i: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row sums of ``a * b`` (group ``i``'s rows), the product in a buffer kept with the layout."""
    prod = layout.buffers.get((i, "p"))
    if prod is None:
        prod = layout.buffers[(i, "p")] = torch.empty_like(a)
    torch.mul(a, b, out=prod)
    return prod.view(prod.shape[0], -1).sum(1) if prod.dim() > 1 else prod.clone()


def pre_step_sums(
    registered: Plan,
    decaying: Plan,
    x: list[torch.Tensor],
    g: list[torch.Tensor | None],
    dtype: torch.dtype,
    weights: Callable[[int], float] | None,
    pack: RowPack | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """Self-Rectifying's pre-step sums from one concatenation of the parameters and one of the
    gradients (``x`` and ``g``: one tensor per entry of ``registered``): ``x . x`` and (with
    ``weights``, the learning rate per parameter) ``lr g . x`` per row of ``decaying``, ``g . g``
    per row of ``registered``. Each equals ``segment_sum`` of the same pair bit for bit (the same
    row sums, selected and accumulated in the same order). With ``x`` packed in ``pack`` the
    parameters are read in their buffers (only ``g`` is concatenated). None where the CPU fast
    path does not apply (a missing gradient, another dtype, a decaying entry outside
    ``registered``, off the CPU)."""
    if not registered or not decaying or any(t is None for t in g):
        return None
    layout = _packed_layout(registered, pack, x)
    if layout is None or not layout.complete:
        layout = _row_layout(registered, x)
    if layout is None or any(t.dtype != torch.float32 for t in g):
        return None
    sub = _sub_rows(decaying, registered, layout)
    if sub is None:
        return None
    d_perm, d_entry = sub
    xx_rows, gx_rows, gg_rows = [], [], []
    for i, group in enumerate(layout.groups):
        if layout.packed is not None:
            X = layout.packed[i].buffer
        else:
            X = _cat_into(layout, (i, "x"), [rows_of(x[e], layout.nhwc[e]) for e in group])
        G = _cat_into(layout, (i, "g"), [rows_of(g[e], layout.nhwc[e]) for e in group])
        for out, (a, b) in ((xx_rows, (X, X)), (gx_rows, (G, X)), (gg_rows, (G, G))):
            if out is not gx_rows or weights is not None:
                out.append(_rowsum(layout, i, a, b))
    xx_all = torch.cat(xx_rows).to(dtype)
    xx = torch.zeros(decaying.num_rows, dtype=dtype, device=xx_all.device)
    xx.index_add_(0, decaying.seg, xx_all.index_select(0, d_perm))
    gx = None
    if weights is not None:
        scale = [weights(pos) for pos, _ in decaying.entries]
        if decaying._weights_sub is None or decaying._weights_sub[0] != scale:
            w = torch.tensor(scale, dtype=dtype, device=xx_all.device)
            decaying._weights_sub = (scale, w.index_select(0, d_entry))
        vals = torch.cat(gx_rows).to(dtype).index_select(0, d_perm) * decaying._weights_sub[1]
        gx = torch.zeros(decaying.num_rows, dtype=dtype, device=xx_all.device).index_add_(0, decaying.seg, vals)
    gg = torch.zeros(registered.num_rows, dtype=dtype, device=xx_all.device)
    gg.index_add_(0, registered.seg, torch.cat(gg_rows).to(dtype).index_select(0, layout.perm))
    return xx, gx, gg


def _sub_rows(sub: Plan, sup: Plan, layout: _RowLayout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For each element of ``sub.sel``: its row in ``sup``'s groups' concatenation, and its entry
    in ``sub`` (built once per pair of plans)."""
    if sub._sub is not None and sub._sub[0] is layout:
        return sub._sub[1]
    where = {key: e for e, key in enumerate(sup.entries)}
    if any(key not in where or sup.sizes[where[key]] != size for key, size in zip(sub.entries, sub.sizes)):
        return None
    to_cat, entry_of = [], []
    for e, (key, size) in enumerate(zip(sub.entries, sub.sizes)):
        start = layout.cat_start[where[key]]
        to_cat.append(torch.arange(start, start + size, device="cpu"))
        entry_of.append(torch.full((size,), e, dtype=torch.long, device="cpu"))
    sel = sub.sel.cpu()
    found = (torch.cat(to_cat).index_select(0, sel), torch.cat(entry_of).index_select(0, sel))
    sub._sub = (layout, found)
    return found


def _cat_into(layout: _RowLayout, slot: tuple[int, int], tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)`` (dim 0) into a contiguous buffer reused across steps; channels_last
    inputs land in logical order, as ``reshape`` would lay them out."""
    buf = layout.buffers.get(slot)
    if buf is None:  # a plan's tensors keep their shapes (a new target set builds a new plan)
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        buf = layout.buffers[slot] = torch.empty(shape, dtype=tensors[0].dtype, device=tensors[0].device)
    if len(tensors) == 1:
        return buf.copy_(tensors[0])
    return torch.cat(tensors, out=buf)


def segment_sum(
    plan: Plan,
    pair: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None],
    dtype: torch.dtype,
    device: torch.device,
    weights: Callable[[int], float] | None = None,
    pack: RowPack | None = None,
) -> torch.Tensor:
    """Per-row sums of ``a * b`` over the planned slices (``a is b``: squared norms).

    ``pair(pos)`` returns ``(a, b)`` for the parameter at registry position ``pos``, or None when
    it contributes nothing (e.g. no gradient). ``weights(pos)``, when given, scales a parameter's
    contribution (the per-parameter learning rate of the radial C_rate). Squared norms of
    parameters packed in ``pack`` are summed in their buffers.
    """
    out = torch.zeros(plan.num_rows, dtype=dtype, device=device)
    if not plan:
        return out
    pairs_all = [pair(pos) for pos, _ in plan.entries]
    layout = None
    if all(ab is not None for ab in pairs_all):
        if all(a is b for a, b in pairs_all):
            layout = _packed_layout(plan, pack, [a for a, _ in pairs_all])
        layout = layout or _row_layout(plan, [ab[0] for ab in pairs_all])
    if layout is not None and all(a.dtype == b.dtype == torch.float32 for a, b in pairs_all):
        vals = _group_rowdots(plan, layout, pairs_all).to(dtype).index_select(0, layout.perm)
        if weights is not None:
            scale = [weights(pos) for pos, _ in plan.entries]
            if plan._weights_sel is None or plan._weights_sel[0] != scale:
                w = torch.tensor(scale, dtype=dtype, device=device)
                plan._weights_sel = (scale, w.index_select(0, layout.weight_entry))
            vals = vals * plan._weights_sel[1]
        return out.index_add_(0, plan.seg, vals)
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
    pack: RowPack | None = None,
) -> None:
    """Multiply every planned slice by its row's factor, in place (one multiply per parameter, or
    per buffer of ``pack`` where the tensors are parameters packed in it).

    An element covered by several rows (only possible with consumer slices) gets the product of
    their factors; elements covered by no row are multiplied by exactly 1.
    """
    if not plan:
        return
    # float32 factors unless a planned tensor is float64 (the factor is cast to the parameter's
    # dtype by the in-place multiply either way).
    tensors = [tensor(pos) for pos, _ in plan.entries]
    layout = _packed_layout(plan, pack, tensors) if plan.unique else None
    if layout is not None:
        full = layout.buffers.get("scale")
        if full is None:  # one factor per row of the buffers; rows outside the plan stay 1
            rows_total = sum(pg.buffer.shape[0] for pg in layout.packed)
            full = layout.buffers["scale"] = torch.ones(rows_total, device=factors.device)  # as below
        full.index_copy_(0, layout.perm, factors.index_select(0, plan.seg).to(full.dtype))
        at = 0
        for pg in layout.packed:
            rows = pg.buffer.shape[0]
            pg.buffer.mul_(full[at : at + rows].view(rows, *[1] * (pg.buffer.dim() - 1)))
            at += rows
        return
    cached = plan._scales
    if cached is not None and len(cached[0]) == len(tensors) and all(a is b for a, b in zip(cached[0], tensors)):
        # The same tensors as last step (the live parameters): the scale views of the kept buffer
        # still broadcast over them, and the positions outside `sel` still hold 1.
        full, targets, scales = cached[1], cached[2], cached[3]
        full.index_copy_(0, plan.sel, factors.index_select(0, plan.seg).to(full.dtype))
        torch._foreach_mul_(targets, scales)
        return
    wide = any(t.dtype == torch.float64 for t in tensors)
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
    targets, scale_list = [tensor(pos) for pos in scales], list(scales.values())
    torch._foreach_mul_(targets, scale_list)
    if plan.unique and len(scales) == len(plan.entries):  # one view per tensor: reusable next step
        plan._scales = (tensors, full, targets, scale_list)


def element_mask(param: torch.Tensor, slices: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
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
