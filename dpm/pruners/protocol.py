"""The contracts between the base pruners, DPM's controller and the stages that run them.

`DecayingPruner` is what every base with DPM inside is (DepGraph's `PruningRounds`, Gate
Decorator's `GateDecorator`, OTOv2's `DHSPG`): it owns a :class:`~dpm.core.DecayController`, names
the structures it may prune as dpm.core Targets (the controller registers them: C_len's families),
answers the controller's `budget=strict` replacement call, and checkpoints itself. When and how it
selects is its own (a round schedule, a tick, a partition inside the optimizer step).

`RoundPruner` is the selection-and-removal algorithm `PruningRounds` drives round by round
(`DepGraphPruner`); another structured pruner plugs into the same driver by meeting it.
"""

from __future__ import annotations

from typing import Collection, Hashable, Protocol, Sequence, runtime_checkable

import torch

from dpm.core import DecayController, Target


@runtime_checkable
class DecayingPruner(Protocol):
    """A base pruning method with DPM's decay inside.

    Example (Gate Decorator)::

        gd = GateDecorator(model, units, skeleton=skeleton, example=x, N=3, rectify=RectifyConfig(budget="strict"))
        gd.controller.replacement == gd.replacement   # the controller asks the pruner for substitutes
    """

    controller: DecayController

    def candidates(self) -> dict[Hashable, Target]:
        """Every structure it may prune, on the live model, by key."""
        ...

    def replacement(self, released: Sequence[Target], excluded: frozenset) -> list[Target]:
        """`budget=strict`: what to admit in place of `released` (never a key in `excluded`)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class RoundPruner(Protocol):
    """A structured pruner that selects by a MACs speed-up target and removes physically."""

    base_native: tuple[int, int]  # (MACs, params) of the model it was built on, its own counter

    def targets(self, include_consumers: bool = False) -> dict[Hashable, Target]:
        """Every prunable structure of the live model, by key."""
        ...

    def select(self, speedup: float, excluded: Collection[Hashable] = ()) -> list[Hashable]:
        """The keys to remove (outside `excluded`) so the model reaches `speedup` over `base_native`."""
        ...

    def importance(self, keys: Collection[Hashable]) -> dict[Hashable, float]:
        """Each key's score; the lowest go first."""
        ...

    def remove(self, keys: Collection[Hashable], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Remove `keys` from the model (and slice the optimizer's state)."""
        ...

    def native_macs_params(self) -> tuple[int, int]:
        """(MACs, params) of the live model, by the pruner's own counter."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
