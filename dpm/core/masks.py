"""The pruned elements: held at exactly zero, with their optimizer state, after every update.

A target that finished its decay (or was admitted with N = 1) is *pruned*: its slices stay at +0.0
until the base method removes them physically. One boolean mask per parameter with pruned slices,
re-applied after each optimizer step, because momentum, weight decay or Adam's moments would
otherwise move the elements off zero again.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .optim_state import zero_state_slices
from .params import ParamIndex
from .segments import element_mask
from .targets import Slice

__all__ = ["PrunedMasks"]


class PrunedMasks:
    """Per parameter position, the elements held at zero.

    Args:
        index: the controller's parameters.
    """

    def __init__(self, index: ParamIndex) -> None:
        self.index = index
        self.masks: dict[int, torch.Tensor] = {}

    def add(self, slices: Iterable[Slice]) -> None:
        """Hold the elements of ``slices`` at zero from now on (one mask op per parameter)."""
        touched: dict[int, list[tuple[int, tuple[int, ...]]]] = {}
        for s in slices:
            touched.setdefault(self.index.position(s.param), []).append((s.dim, s.indices))
        for pos, group in touched.items():
            new = element_mask(self.index.params[pos], group)
            old = self.masks.get(pos)
            self.masks[pos] = new if old is None else old | new

    def apply(
        self,
        get: Callable[[int], torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        positions: set[int] | None = None,
    ) -> None:
        """Zero the masked elements of ``get(pos)`` and their optimizer state (only ``positions``
        when given)."""
        # masked_fill (not a multiply) so pruned elements are +0.0, bitwise what zero_() gives.
        for pos, mask in self.masks.items():
            if positions is not None and pos not in positions:
                continue
            get(pos).masked_fill_(mask, 0)
            zero_state_slices(optimizer, self.index.params[pos], mask)

    def of(self, param: torch.Tensor) -> torch.Tensor:
        """A copy of ``param``'s mask (all False when nothing of it is pruned)."""
        mask = self.masks.get(self.index.position(param))
        return mask.clone() if mask is not None else torch.zeros(param.shape, dtype=torch.bool, device=param.device)
