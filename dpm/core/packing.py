"""Row packing: same-shaped parameters in one buffer, so a per-row op runs once per shape group.

On CPU a decay step's norms and factors are memory-bound passes over the rows of every parameter
with a decaying row. With each parameter in its own storage the controller must first copy the
rows of a shape group into one matrix (``torch.cat``), or dispatch one small op per parameter.
A :class:`RowPack` moves each group of parameters whose rows have the same shape (and memory
format and dtype) into one contiguous buffer and points every parameter's ``.data`` at its slice:
the same ``Parameter`` objects, values and strides (channels_last stays channels_last), so the
model, the optimizer and checkpoints see no difference, while the group's rows are one
``(rows, K)`` matrix the controller reads and scales in place.

Anything that later replaces a parameter's ``.data`` (``model.to(...)``, ``load_state_dict(...,
assign=True)``) takes it out of its buffer; :meth:`RowPack.intact` notices and the controller packs
again (a copy, the values unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .params import ParamIndex

__all__ = ["Packing", "RowPack", "PackGroup", "rows_of", "is_channels_last"]


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-d tensor stored channels_last (and not also contiguous, as 1x1 kernels are)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def rows_of(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """``t``'s rows (dim 0) in memory order: a channels_last tensor as (O, H, W, I)."""
    return t.permute(0, 2, 3, 1) if nhwc else t


@dataclass
class PackGroup:
    """One buffer: ``buffer[start[i] : start[i] + rows[i]]`` holds the rows of ``members[i]``.

    Attributes:
        buffer: ``(total rows, *row shape)``, contiguous.
        members: the registry positions of the parameters in it, in buffer order.
        start, rows: the first row and the number of rows of each member.
        nhwc: the members are channels_last (their rows read as (H, W, I)).
    """

    buffer: torch.Tensor
    members: list[int]
    start: list[int]
    rows: list[int]
    nhwc: bool


def _packable(p: torch.Tensor, ours: set[int]) -> bool:
    if p.dim() == 0 or p.shape[0] == 0 or p.dtype != torch.float32 or p.device.type != "cpu":
        return False
    if id(p) in ours:  # already in a buffer of ours: free to move into the next one
        return True
    # Only a parameter that owns its storage: one sharing it with another tensor (a tie made
    # through .data) would be silently untied by the copy.
    whole = p.untyped_storage().nbytes() == p.numel() * p.element_size()
    return whole and (p.is_contiguous() or is_channels_last(p))


class RowPack:
    """The packed parameters of a controller, one :class:`PackGroup` per row shape.

    Args:
        params: the controller's parameters by position.
        positions: the positions to pack (those sliced along dim 0 by some target); float32 CPU
            parameters that own their storage (or sit in ``previous``) are packed, others skipped.
        previous: the pack this one replaces (its members may move into the new buffers).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], positions: Iterable[int], previous: RowPack | None = None
    ) -> None:
        ours = {id(p) for p, _ in previous._ptrs} if previous is not None else set()
        by_key: dict[tuple, list[int]] = {}
        for pos in sorted(set(positions)):
            p = params[pos]
            if _packable(p, ours):
                nhwc = is_channels_last(p)
                by_key.setdefault((nhwc, tuple(rows_of(p, nhwc).shape[1:])), []).append(pos)
        self.groups: list[PackGroup] = []
        self.where: dict[int, tuple[int, int]] = {}  # position -> (group, member index)
        with torch.no_grad():
            for (nhwc, shape), members in by_key.items():
                rows = [params[pos].shape[0] for pos in members]
                buffer = torch.empty((sum(rows), *shape), dtype=torch.float32, device="cpu")
                start, at = [], 0
                for i, (pos, n) in enumerate(zip(members, rows)):
                    p = params[pos]
                    view = buffer[at : at + n]
                    view.copy_(rows_of(p.data, nhwc))
                    # Its own strides exactly (a 1x1 kernel's can be either format's).
                    p.data = view.as_strided(p.shape, p.stride(), view.storage_offset())
                    start.append(at)
                    self.where[pos] = (len(self.groups), i)
                    at += n
                self.groups.append(PackGroup(buffer, members, start, rows, nhwc))
        self.positions = frozenset(self.where)
        self.members = {pos: params[pos] for pos in self.where}  # position -> the packed parameter
        self._ptrs = [(p, p.data_ptr()) for p in self.members.values()]

    def __bool__(self) -> bool:
        return bool(self.groups)

    def intact(self) -> bool:
        """Whether every member still views its slot (nothing replaced its ``.data``)."""
        return all(p.data_ptr() == ptr for p, ptr in self._ptrs)


class Packing:
    """A controller's :class:`RowPack`, made at the first step that needs it and again after the
    packed set changed (:meth:`invalidate`) or something moved a member out of its buffer.

    Args:
        enabled: pack at all (only CPU parameters are ever packed).
        index: the controller's parameters (``index.params`` by position).
        positions: returns the positions to pack (called only when packing).
    """

    def __init__(self, enabled: bool, index: ParamIndex, positions: Callable[[], Iterable[int]]) -> None:
        self.enabled, self.index, self.positions = enabled, index, positions
        self.pack: RowPack | None = None
        self._stale = True

    def invalidate(self) -> None:
        """The set to pack changed: pack again at the next :meth:`current`."""
        self._stale = True

    def current(self) -> RowPack | None:
        """The pack, made again if stale or no longer intact; None when disabled."""
        if not self.enabled:
            return None
        if self._stale or self.pack is None or not self.pack.intact():
            self.pack = RowPack(self.index.params, self.positions(), previous=self.pack)
            self._stale = False
        return self.pack
