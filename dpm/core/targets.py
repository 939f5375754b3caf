"""Targets: the prunable structures DPM decays (docs/method.md section 2).

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

import operator
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Sequence

import torch

__all__ = ["Slice", "Target", "channel_targets"]


def _is_bool(v: Any) -> bool:
    # numpy's bool scalar is ``numpy.bool`` (2.x) or ``numpy.bool_`` (1.x); dpm.core imports only
    # torch, so it is recognised by name.
    return (
        isinstance(v, bool)
        or type(v).__name__ in ("bool", "bool_")
        or (isinstance(v, torch.Tensor) and v.dtype == torch.bool)
    )


def _integer(v: Any, what: str, fix: str) -> int:
    """``v`` as an int if it is an integer (python, numpy, one-element integer tensor), else a
    TypeError. Floats are never rounded and bools never read as 0/1: either would silently name
    another channel than the caller meant."""
    if _is_bool(v) or isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
        raise TypeError(f"{what} must be an integer, got {v!r}: {fix}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {v!r} ({type(v).__name__}): {fix}") from None


_FIX = "pass integer indices (or a 1-D bool tensor of the dimension's length as a mask)"


def _as_index_tuple(indices: Any, size: int) -> tuple[int, ...]:
    what = "Slice.indices"
    if not isinstance(indices, torch.Tensor) and hasattr(indices, "dtype") and hasattr(indices, "shape"):
        indices = torch.as_tensor(indices)  # a numpy array: judged by its dtype like a tensor
    if isinstance(indices, torch.Tensor):
        if indices.dtype == torch.bool:
            # A mask over the dimension: only a 1-D one of exactly its length, so that a short
            # bool tensor is never mistaken for indices 0/1.
            if indices.dim() != 1 or indices.numel() != size:
                raise ValueError(
                    f"{what} is a bool mask of shape {tuple(indices.shape)}: a mask must "
                    f"be 1-D of length {size} (the dimension's size), or pass integer indices"
                )
            idx = tuple(int(i) for i in indices.nonzero().flatten().tolist())
            if not idx:
                raise ValueError(f"{what} is a bool mask that selects nothing: a slice must name at least one index")
            return idx
        if indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"{what} must be integer indices, got a {indices.dtype} tensor: {_FIX}")
        return tuple(int(i) for i in indices.reshape(-1).tolist())
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        return (_integer(indices, "a Slice index", _FIX),)
    items = list(indices)
    if items and all(_is_bool(i) for i in items):
        raise TypeError(
            f"{what} is a list of bools: pass integer indices, or a 1-D bool tensor "
            "(torch.tensor(mask)) to select by mask"
        )
    return tuple(_integer(i, "a Slice index", _FIX) for i in items)


@dataclass(frozen=True, eq=False)
class Slice:
    """The elements of ``param`` whose index along ``dim`` is in ``indices``.

    ``indices`` are integers: an int, a sequence of ints (python or numpy), an integer tensor or
    numpy array. A 1-D bool tensor (or numpy array) of the dimension's length is accepted as a mask
    and stored as its True positions. Floats and bools (``True``, a list of bools) are refused
    rather than read as 0/1 or rounded, so a slice never silently names another channel.

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
        dim = _integer(self.dim, "Slice.dim", "pass the dimension as an int")
        if dim < 0:
            dim += ndim
        if not 0 <= dim < ndim:
            raise ValueError(f"Slice.dim={self.dim} is out of range for a {ndim}-d parameter")
        size = self.param.shape[dim] if self.param.dim() > 0 else 1
        idx = _as_index_tuple(self.indices, size)
        if not idx:
            raise ValueError("Slice.indices is empty: a slice must name at least one index")
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
