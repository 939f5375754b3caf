"""OTOv2's zero-invariant groups (ZIGs) on Torch-Pruning's dependency groups: the producer rows
of one group, the unit DHSPG updates, zeroes and DPM decays (docs/otov2-dhspg.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch
from torch import nn

from dpm.core import Target
from dpm.pruners.depgraph import DepGraphPruner

__all__ = ["ZeroInvariantGroup", "zero_invariant_groups", "zigs_of"]

# 2.0.16's group types; only the two that DHSPG updates row-wise occur here.
_LINEAR, _CONV = 4, 5


@dataclass
class _Producer:
    param: nn.Parameter
    dim: int
    index: torch.Tensor | None  # None: the rows are the param's dim-0 rows in order (a plain view)
    per_row: int  # indices along ``dim`` per group


class ZeroInvariantGroup:
    """One ZIG: ``num_groups`` rows, row ``i`` the concatenation of every producer's slice ``i``.

    Built from :class:`dpm.core.Target` objects of one family (one per channel, same producer
    parameters in the same order), which also name the rows (``keys[i]``) for the decay controller.
    """

    def __init__(self, name: str, targets: Sequence[Target], linear: bool = False) -> None:
        if not targets:
            raise ValueError(f"ZIG {name!r} has no groups")
        self.name = name
        self.keys: list[Hashable] = [t.key for t in targets]
        self.targets: list[Target] = list(targets)
        first = targets[0].producers
        self.producers: list[_Producer] = []
        for j, s in enumerate(first):
            rows: list[int] = []
            for t in targets:
                ps = t.producers
                if (
                    len(ps) != len(first)
                    or ps[j].param is not s.param
                    or ps[j].dim != s.dim
                    or len(ps[j].indices) != len(s.indices)
                ):
                    raise NotImplementedError(f"ZIG {name!r}: channels slice different parameters")
                rows.extend(ps[j].indices)
            p = s.param
            size = p.shape[s.dim] if p.dim() > 0 else 1
            if sorted(rows) != list(range(size)):
                raise NotImplementedError(
                    f"ZIG {name!r} covers {len(rows)} of the {size} rows of a {tuple(p.shape)} parameter along dim "
                    f"{s.dim}: DHSPG needs every producer row in exactly one group"
                )
            identity = s.dim == 0 and rows == list(range(size)) and len(s.indices) == 1
            index = None if identity else torch.tensor(rows, dtype=torch.long, device=p.device)
            self.producers.append(_Producer(p, s.dim, index, len(s.indices)))
        self.num_groups = len(targets)
        # 2.0.16 counts linear and conv ZIGs in separate float32 buckets (see compute_group_sparsity).
        self.group_type = _LINEAR if linear else _CONV

    @property
    def params(self) -> list[nn.Parameter]:
        """The producer parameters, in row-concatenation order."""
        return [p.param for p in self.producers]

    def gather(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ``[num_groups, n]`` group matrix of ``tensors`` (one per producer, parameter-shaped)."""
        cols = []
        for pr, t in zip(self.producers, tensors):
            if pr.index is None:
                cols.append(t.reshape(self.num_groups, -1))
            else:
                cols.append(t.index_select(pr.dim, pr.index).movedim(pr.dim, 0).reshape(self.num_groups, -1))
        return torch.cat(cols, dim=1)

    def row_norms(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """L2 norm of every row, from each producer's rows in place (no group matrix is built)."""
        sq = None
        for pr, t in zip(self.producers, self.params if tensors is None else tensors):
            rows = (
                t.reshape(self.num_groups, -1)
                if pr.index is None
                else t.index_select(pr.dim, pr.index).movedim(pr.dim, 0).reshape(self.num_groups, -1)
            )
            n = torch.linalg.vector_norm(rows, dim=1)
            sq = n * n if sq is None else sq + n * n
        return sq.sqrt()

    def zero_rows(self, mask: torch.Tensor) -> None:
        """Set the rows in ``mask`` (bool, one per group) to exactly zero in every producer."""
        for pr in self.producers:
            p = pr.param
            if pr.index is None:
                p.data.masked_fill_(mask.view(-1, *[1] * (p.dim() - 1)), 0.0)
            else:
                idx = pr.index.view(self.num_groups, pr.per_row)[mask].flatten()
                p.data.index_fill_(pr.dim, idx, 0.0)

    def scatter(self, matrix: torch.Tensor) -> None:
        """Write a group matrix back into the producer parameters (2.0.16's ``update_xs``)."""
        left = 0
        for pr in self.producers:
            p = pr.param
            width = p.numel() // self.num_groups
            block = matrix[:, left : left + width]
            left += width
            if pr.index is None:
                p.data.copy_(block.reshape(p.shape))
            else:
                moved = list(p.shape)
                moved.insert(0, moved.pop(pr.dim))
                p.data.index_copy_(pr.dim, pr.index, block.reshape(moved).movedim(0, pr.dim))


def zero_invariant_groups(
    model: nn.Module, example_inputs: torch.Tensor, num_classes: int
) -> tuple[list["ZeroInvariantGroup"], Any]:
    """The ZIGs of ``model`` from Torch-Pruning's dependency groups (classifier ignored).

    Returns ``(zigs, pruner)``: the pruner (a :class:`dpm.pruners.DepGraphPruner`) names the groups'
    channels ``(group_name, channel)`` and removes them physically at the end.
    """
    pruner = DepGraphPruner(model, example_inputs, num_classes=num_classes, iterative_steps=1)
    return zigs_of(pruner), pruner


def zigs_of(pruner) -> list["ZeroInvariantGroup"]:
    """One ZIG per dependency group of ``pruner`` (families of its targets), sorted by name."""
    linear = {id(p) for m in pruner.model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    families: dict[Hashable, list[Target]] = {}
    for t in pruner.targets().values():
        families.setdefault(t.family, []).append(t)
    zigs = [
        ZeroInvariantGroup(str(f), ts, linear=any(id(s.param) in linear for s in ts[0].producers))
        for f, ts in sorted(families.items(), key=lambda kv: str(kv[0]))
    ]
    seen: set[int] = set()
    for z in zigs:
        for p in z.params:
            if id(p) in seen:
                raise NotImplementedError(f"parameter {tuple(p.shape)} is a producer of two ZIGs")
            seen.add(id(p))
    return zigs
