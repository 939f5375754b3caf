"""The parameters a controller slices, by position, and what a step reads from them.

Targets name parameters by object; the controller's tables name them by *position* in this index
(plans are sorted by it), and checkpoints by *name*, so a restored controller finds its targets on
another process's copy of the model.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from .targets import Target

__all__ = ["ParamIndex", "ParamsLike", "TensorMap"]

ParamsLike = nn.Module | Iterable[torch.Tensor] | Mapping[str, torch.Tensor]
TensorMap = Mapping[torch.Tensor, torch.Tensor]


def _named_params(params: ParamsLike) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, nn.Module):
        return list(params.named_parameters())  # shared parameters are listed once
    if isinstance(params, Mapping):
        return [(str(k), v) for k, v in params.items()]
    out, seen = [], set()
    for i, p in enumerate(params):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((str(i), p))
    return out


class ParamIndex:
    """The controller's parameters: ``names[i]`` and ``params[i]`` at position ``i``.

    Args:
        params: a model (named by ``named_parameters``), a ``{name: param}`` mapping or an iterable
            of parameters (named by position).
    """

    def __init__(self, params: ParamsLike) -> None:
        self.bind(params)

    def bind(self, params: ParamsLike) -> None:
        """Index another set of parameters (after physical pruning replaced them)."""
        named = _named_params(params)
        if not named:
            raise ValueError("DecayController needs at least one parameter")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.pos = {id(p): i for i, p in enumerate(self.params)}
        self.by_name = {n: i for i, n in enumerate(self.names)}
        self.device = self.params[0].device
        self._group_cache: tuple[tuple[int, int, int], dict[int, dict]] | None = None

    def named(self) -> dict[str, torch.Tensor]:
        """``{name: param}`` in position order (``bind`` restores exactly this index from it)."""
        return dict(zip(self.names, self.params))

    def position(self, param: torch.Tensor) -> int:
        """The position of ``param``; a ValueError for a tensor not in the index."""
        try:
            return self.pos[id(param)]
        except KeyError:
            raise ValueError(
                f"a target slices a {tuple(param.shape)} tensor that is not among the controller's "
                "parameters: build targets from the same model/parameters given to DecayController "
                "(after replacing parameters, call bind())"
            ) from None

    def holds(self, target: Target) -> bool:
        """Whether every slice of ``target`` is on an indexed parameter."""
        return all(id(s.param) in self.pos for s in target.slices)

    def getter(self, tensors: TensorMap | None) -> Callable[[int], torch.Tensor]:
        """position -> the tensor a step works on: ``tensors[param]`` if given, else the parameter."""
        if not tensors:
            return self.params.__getitem__
        for p, t in tensors.items():
            if t.shape != p.shape:
                raise ValueError(f"tensors[param] has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")

        def get(pos: int) -> torch.Tensor:
            p = self.params[pos]
            return tensors.get(p, p)

        return get

    def grad(self, pos: int, grads: TensorMap | None) -> torch.Tensor | None:
        """The raw loss gradient at ``pos``: ``grads[param]`` if given, else ``param.grad``."""
        p = self.params[pos]
        if grads is not None and p in grads:
            return grads[p]
        return p.grad

    def learning_rates(self, optimizer: torch.optim.Optimizer | None, lr: float | None) -> Callable[[int], float]:
        """position -> learning rate: ``lr`` if given, else the optimizer's param group's."""
        if lr is not None:
            return lambda pos: float(lr)
        opt = optimizer
        if opt is None:
            raise ValueError("radial C_rate needs the learning rate: pass an optimizer or lr=")
        # Re-read the groups when the optimizer or its group/parameter counts changed (e.g. an
        # add_param_group between steps): O(#groups) per step, not O(#params).
        sig = (id(opt), len(opt.param_groups), sum(len(g["params"]) for g in opt.param_groups))
        if self._group_cache is None or self._group_cache[0] != sig:
            groups = {}
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in self.pos:
                        groups[self.pos[id(p)]] = g
            self._group_cache = (sig, groups)
        groups = self._group_cache[1]

        def lr_of(pos: int) -> float:
            try:
                return float(groups[pos]["lr"])
            except KeyError:
                raise ValueError(f"parameter {self.names[pos]!r} is decaying but not in the optimizer") from None

        return lr_of
