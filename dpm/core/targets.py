"""Targets: the prunable structures DPM decays (method.md section 2).

A target is every parameter slice that the base pruner removes together (one channel of a
dependency group, one OTOv2 zero-invariant group, one gated channel). Its vector ``x`` is the
concatenation of its *producer* slices (conv/linear output rows and bias, BN weight and bias).
*Consumer* slices (the next layer's input columns) are carried along but only decayed under the
``include_consumers`` ablation, because they also sit in the next layer's producer rows and two
decaying targets would otherwise fight over the same elements.

This module only describes targets; it never touches a pruner. Builders from Torch-Pruning groups
live with the DepGraph pruner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

import torch

__all__ = ["Slice", "Target", "channel_targets"]


def _as_index_tuple(indices: int | Iterable[int] | torch.Tensor) -> tuple[int, ...]:
    if isinstance(indices, torch.Tensor):
        return tuple(int(i) for i in indices.reshape(-1).tolist())
    if isinstance(indices, int):
        return (int(indices),)
    return tuple(int(i) for i in indices)


@dataclass(frozen=True, eq=False)
class Slice:
    """The elements of ``param`` whose index along ``dim`` is in ``indices``.

    ``consumer=False`` (a producer slice) makes the slice part of the target's vector ``x``;
    ``consumer=True`` marks an input-column slice of a following layer, decayed only when the
    controller runs with ``include_consumers=True``.
    """

    param: torch.Tensor
    dim: int
    indices: tuple[int, ...]
    consumer: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.param, torch.Tensor):
            raise TypeError(f"Slice.param must be a tensor, got {type(self.param).__name__}")
        ndim = max(self.param.dim(), 1)
        dim = int(self.dim)
        if dim < 0:
            dim += ndim
        if not 0 <= dim < ndim:
            raise ValueError(f"Slice.dim={self.dim} is out of range for a {ndim}-d parameter")
        idx = _as_index_tuple(self.indices)
        if not idx:
            raise ValueError("Slice.indices is empty: a slice must name at least one index")
        size = self.param.shape[dim] if self.param.dim() > 0 else 1
        if min(idx) < 0 or max(idx) >= size:
            raise ValueError(f"Slice.indices {idx} out of range [0, {size}) along dim {dim}")
        if len(set(idx)) != len(idx):
            raise ValueError(f"Slice.indices {idx} contains duplicates")
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "indices", idx)

    def same_as(self, other: "Slice") -> bool:
        """Structural equality (same parameter object, dim, indices and role)."""
        return (
            self.param is other.param
            and self.dim == other.dim
            and self.indices == other.indices
            and self.consumer == other.consumer
        )

    def numel(self) -> int:
        """Number of parameter elements the slice covers."""
        if self.param.dim() <= 1:
            return len(self.indices)
        return len(self.indices) * (self.param.numel() // self.param.shape[self.dim])


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable structure.

    Args:
        key: a hashable, picklable identifier chosen by the caller (e.g. ``("layer1.0.conv1", 7)``).
            Keys name targets in every set the controller returns, in logs and in ``state_dict``;
            plain tuples/str/int keep checkpoints loadable with ``torch.load(weights_only=True)``.
        family: the parallel structures of the same layer / dependency group (C_len compares a
            target's gradient with its family's mean). Every member of a family must have its
            producer slices on the same parameters; the controller rejects families that mix layers.
        slices: the producer slices (at least one) and, optionally, consumer slices.
    """

    key: Hashable
    family: Hashable
    slices: tuple[Slice, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        slices = tuple(self.slices)
        if not all(isinstance(s, Slice) for s in slices):
            raise TypeError("Target.slices must be Slice objects")
        if not any(not s.consumer for s in slices):
            raise ValueError(f"target {self.key!r} has no producer slice")
        hash(self.key)
        hash(self.family)
        object.__setattr__(self, "slices", slices)

    @property
    def producers(self) -> tuple[Slice, ...]:
        """The slices whose concatenation is the target's vector ``x``."""
        return tuple(s for s in self.slices if not s.consumer)

    @property
    def consumers(self) -> tuple[Slice, ...]:
        """Input-column slices of following layers (decayed only with ``include_consumers``)."""
        return tuple(s for s in self.slices if s.consumer)

    def same_as(self, other: "Target") -> bool:
        """Structural equality: same key, family and slices."""
        return (
            self.key == other.key
            and self.family == other.family
            and len(self.slices) == len(other.slices)
            and all(a.same_as(b) for a, b in zip(self.slices, other.slices))
        )


def channel_targets(
    layer: str,
    producers: Sequence[tuple[torch.Tensor, int]],
    consumers: Sequence[tuple[torch.Tensor, int]] = (),
    channels: Iterable[int] | None = None,
    family: Hashable | None = None,
) -> list[Target]:
    """One target per channel of a layer: channel ``c`` is index ``c`` of every given (param, dim).

    ``producers`` are e.g. ``[(conv.weight, 0), (conv.bias, 0), (bn.weight, 0), (bn.bias, 0)]``,
    ``consumers`` e.g. ``[(next_conv.weight, 1)]``. Keys are ``(layer, c)``; the family defaults to
    ``layer`` so C_len compares channels of this layer only.
    """
    if not producers:
        raise ValueError("channel_targets needs at least one producer (param, dim)")
    sizes = {p.shape[d] for p, d in list(producers) + list(consumers)}
    if len(sizes) != 1:
        raise ValueError(f"channel_targets: (param, dim) pairs of {layer!r} disagree on size {sizes}")
    size = sizes.pop()
    fam = layer if family is None else family
    chans = range(size) if channels is None else channels
    out = []
    for c in chans:
        slices = [Slice(p, d, (c,)) for p, d in producers]
        slices += [Slice(p, d, (c,), consumer=True) for p, d in consumers]
        out.append(Target((layer, int(c)), fam, tuple(slices)))
    return out
