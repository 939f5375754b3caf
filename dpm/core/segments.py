"""Segment plans: the vectorised machinery behind every per-step quantity.

A *plan* is built once when a target set changes. For each parameter it holds, per dimension the
targets slice along, two index tensors: ``sel`` (indices along that dim) and ``seg`` (the row of the
target each index belongs to). A per-step quantity then costs a fixed number of tensor ops per
parameter, whatever the number of targets:

* segment sums (norms, dot products): reduce the element-wise tensor over every other dim, gather
  ``sel``, ``index_add_`` into ``seg``;
* rescaling: gather the per-target factors into a per-index vector with ``index_reduce_('prod')``
  (so an element in several targets gets the product of their factors) and multiply the parameter
  by its broadcast.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .targets import Target

__all__ = ["DimPlan", "ParamPlan", "build_plan", "segment_sum", "apply_factors", "element_mask"]


@dataclass
class DimPlan:
    """Indices ``sel`` along ``dim`` and the target row ``seg`` of each."""

    dim: int
    sel: torch.Tensor
    seg: torch.Tensor
    unique: bool = True  # no index of ``sel`` repeats (every element in at most one row)


@dataclass
class ParamPlan:
    """The dim plans of one parameter (``pos`` = its position in the controller's registry)."""

    pos: int
    dims: list[DimPlan]


def build_plan(
    rows: Sequence[Target],
    position: Callable[[torch.Tensor], int],
    device: torch.device,
    consumers: bool = False,
) -> list[ParamPlan]:
    """Plan over the producer slices of ``rows`` (plus consumer slices when ``consumers``).

    Parameters are ordered by registry position and indices by row order, so two plans built from
    the same rows accumulate in the same order (a resumed run reproduces sums bitwise).
    """
    acc: dict[int, dict[int, tuple[list[int], list[int]]]] = {}
    for r, t in enumerate(rows):
        for s in t.slices:
            if s.consumer and not consumers:
                continue
            sel, seg = acc.setdefault(position(s.param), {}).setdefault(s.dim, ([], []))
            sel.extend(s.indices)
            seg.extend([r] * len(s.indices))
    plan = []
    for pos in sorted(acc):
        dims = [
            DimPlan(
                dim,
                torch.tensor(sel, dtype=torch.long, device=device),
                torch.tensor(seg, dtype=torch.long, device=device),
                unique=len(set(sel)) == len(sel),
            )
            for dim, (sel, seg) in sorted(acc[pos].items())
        ]
        plan.append(ParamPlan(pos, dims))
    return plan


def _reduce_to_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    if t.dim() <= 1:
        return t.reshape(-1)
    return t.sum(dim=[d for d in range(t.dim()) if d != dim])


def segment_sum(
    plan: Sequence[ParamPlan],
    num_rows: int,
    values: Callable[[int], torch.Tensor | None],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Per-row sums of an element-wise quantity over the planned slices.

    ``values(pos)`` returns the element-wise tensor for the parameter at registry position ``pos``
    (e.g. ``x * x``), or None to skip it (e.g. no gradient).
    """
    out = torch.zeros(num_rows, dtype=dtype, device=device)
    for pp in plan:
        v = values(pp.pos)
        if v is None:
            continue
        for dp in pp.dims:
            red = _reduce_to_dim(v, dp.dim)
            out.index_add_(0, dp.seg, red.index_select(0, dp.sel).to(dtype))
    return out


def apply_factors(
    plan: Sequence[ParamPlan],
    factors: torch.Tensor,
    tensor: Callable[[int], torch.Tensor],
) -> None:
    """Multiply every planned slice by its row's factor, in place (one fused multiply per param).

    An element covered by several rows (only possible with consumer slices) gets the product of
    their factors; elements covered by no row are multiplied by exactly 1.
    """
    for pp in plan:
        t = tensor(pp.pos)
        scale = None
        for dp in pp.dims:
            size = t.shape[dp.dim] if t.dim() > 0 else 1
            vec = torch.ones(size, dtype=t.dtype, device=t.device)
            vals = factors.index_select(0, dp.seg).to(t.dtype)
            if dp.unique:
                vec.index_copy_(0, dp.sel, vals)
            else:
                # Repeated indices (overlapping consumer slices): the product of their factors.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="index_reduce", category=UserWarning)
                    vec.index_reduce_(0, dp.sel, vals, "prod")
            shape = [1] * t.dim()
            if shape:
                shape[dp.dim] = -1
            vec = vec.view(shape)
            scale = vec if scale is None else scale * vec
        if scale is not None:
            t.mul_(scale)


def element_mask(
    param: torch.Tensor, slices: Sequence[tuple[int, Sequence[int]]]
) -> torch.Tensor:
    """Boolean mask of ``param``'s shape, True on the union of (dim, indices) slices."""
    mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    by_dim: dict[int, list[int]] = {}
    for dim, idx in slices:
        by_dim.setdefault(dim, []).extend(idx)
    for dim, idx in by_dim.items():
        index = torch.tensor(sorted(set(idx)), dtype=torch.long, device=param.device)
        if param.dim() == 0:
            mask.fill_(True)
        else:
            mask.index_fill_(dim, index, True)
    return mask
