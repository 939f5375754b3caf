"""Zeroing the optimizer state of pruned slices.

A pruned slice is kept at exactly zero by re-masking after every step; its optimizer state is
zeroed too, so that momentum / Adam moments do not keep a removed structure "alive" in the state a
checkpoint stores. The rule is generic: every tensor in ``optimizer.state[p]`` with the parameter's
shape is element-wise state (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``, RMSprop ``square_avg``, ...); scalars such as Adam's ``step`` are left alone.
"""

from __future__ import annotations

import torch

__all__ = ["zero_state_slices"]


def zero_state_slices(optimizer: torch.optim.Optimizer | None, param: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``optimizer.state[param]``'s element-wise tensors to 0 where ``mask`` is True."""
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.masked_fill_(mask, 0)
