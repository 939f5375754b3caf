"""Gated BatchNorm (Gate Decorator, You et al. 2019): BN(x) * g * mask, and its folding back into BN.

Each BatchNorm2d of a network becomes a :class:`GatedBatchNorm2d`: a per-channel gate ``g``
(initialised from the BN scale gamma, which is then frozen at 1 with the bias rescaled to
beta / gamma, so the function is unchanged) and a 0/1 ``mask`` buffer. Gate Decorator scores and
prunes channels through ``g`` and ``mask`` only; :func:`fold_gates` ("melt", first half) turns every
gated BN back into a plain BatchNorm2d whose masked channels output exactly zero, ready for the
physical removal in :mod:`dpm.pruners.gate_decorator_units`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GatedBatchNorm2d", "gate_model", "fold_gates", "gated_modules"]


class GatedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with its scale moved into a gate: ``forward(x) = BN_{1, b}(x) * g * mask``.

    ``weight`` stays a parameter (so state_dicts keep BN's layout) but is frozen at 1
    (``requires_grad=False``); ``gate`` is the trainable per-channel scale and ``mask`` the 0/1
    channel mask (a buffer, checkpointed with the model).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True, device=device, dtype=dtype
        )
        self.gate = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("mask", torch.ones(num_features, device=device, dtype=dtype))
        self.weight.requires_grad_(False)

    @classmethod
    @torch.no_grad()
    def from_bn(cls, bn: nn.BatchNorm2d) -> "GatedBatchNorm2d":
        """The gated equivalent of ``bn``: g = gamma, weight = 1, bias = beta / gamma.

        A channel with gamma == 0 outputs beta (a constant) in ``bn`` and cannot be written as
        ``(x_hat + b) * 0``; its bias is set to 0, so it outputs 0 instead (Gate Decorator's own
        code clamps beta / gamma to [-10, 10] for the same reason). Trained networks have no such
        channel; it is the one case where gating changes the function.
        """
        if not bn.affine or not bn.track_running_stats:
            raise ValueError(f"gating needs an affine BatchNorm2d with running statistics, got {bn}")
        gated = cls(bn.num_features, bn.eps, bn.momentum, device=bn.weight.device, dtype=bn.weight.dtype)
        gamma = bn.weight.detach()
        nonzero = gamma != 0
        gated.gate.copy_(gamma)
        gated.bias.copy_(
            torch.where(nonzero, bn.bias / torch.where(nonzero, gamma, torch.ones_like(gamma)), torch.zeros_like(gamma))
        )
        gated.weight.fill_(1.0)
        gated.running_mean.copy_(bn.running_mean)
        gated.running_var.copy_(bn.running_var)
        gated.num_batches_tracked.copy_(bn.num_batches_tracked)
        gated.train(bn.training)
        return gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (self.gate * self.mask).view(1, -1, *([1] * (x.dim() - 2)))
        return super().forward(x) * scale

    @torch.no_grad()
    def folded(self) -> nn.BatchNorm2d:
        """A plain BatchNorm2d computing the same function: weight = g * mask, bias = b * g * mask.

        Masked channels get weight = bias = 0 and so output exactly 0 in train and eval mode.
        """
        bn = nn.BatchNorm2d(
            self.num_features, eps=self.eps, momentum=self.momentum, device=self.weight.device, dtype=self.weight.dtype
        )
        scale = self.gate * self.mask
        bn.weight.copy_(self.weight * scale)
        bn.bias.copy_(self.bias * scale)
        bn.running_mean.copy_(self.running_mean)
        bn.running_var.copy_(self.running_var)
        bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.train(self.training)
        return bn


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def gate_model(model: nn.Module) -> list[str]:
    """Replace every BatchNorm2d of ``model`` (in place) by its :class:`GatedBatchNorm2d`.

    Returns the names of the gated modules, in ``named_modules`` order.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]
    for name in names:
        _replace(model, name, GatedBatchNorm2d.from_bn(model.get_submodule(name)))
    return names


def fold_gates(model: nn.Module) -> list[str]:
    """Replace every :class:`GatedBatchNorm2d` (in place) by its :meth:`~GatedBatchNorm2d.folded` BN."""
    names = [n for n, m in model.named_modules() if isinstance(m, GatedBatchNorm2d)]
    for name in names:
        _replace(model, name, model.get_submodule(name).folded())
    return names


def gated_modules(model: nn.Module) -> dict[str, GatedBatchNorm2d]:
    """``{name: module}`` of the gated BNs of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedBatchNorm2d)}
