"""Gate Decorator's channel units: which gated channels are one prunable structure, and their removal.

The coupling comes from Torch-Pruning's dependency graph, through :class:`DepGraphPruner`'s
channel targets: one unit per channel of a dependency group, keyed ``(group_name, channel)``
exactly as the DepGraph base names them. A plain conv-BN channel is a unit of one BN channel; the
channels tied by a residual add (a ResNet stage's stem/``bn2``/shortcut BNs) form one unit with
one BN channel per coupled BN, scored and masked together. The same graph removes the masked
units physically at the melt (:func:`remove_channels`), and predicts the MACs that removal
leaves (:func:`macs_without`), which is what the FLOPs stopping rule reads.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from dpm.measure import thop_default_macs_params
from dpm.models import keep_memory_format
from dpm.pruners.depgraph import DepGraphPruner, _Modes

__all__ = ["ChannelUnit", "channel_units", "remove_channels", "macs_without"]

Key = tuple[str, int]


@dataclass(frozen=True)
class ChannelUnit:
    """One prunable channel: the BN channels it gates and the producer rows that compute it.

    Attributes:
        key: ``(group_name, channel)`` (DepGraph's naming; channel = index in the group's anchor).
        group: the dependency group (the unit's family: C_len compares units of one group).
        bns: ``(bn_module_name, channel_index)`` per coupled BatchNorm.
        producers: ``(param_name, dim, indices)`` of the conv/linear output rows and biases that
            produce the channel (the conv filters of the "whole channel" decay option).
    """

    key: Key
    group: str
    bns: tuple[tuple[str, int], ...]
    producers: tuple[tuple[str, int, tuple[int, ...]], ...]


def channel_units(model: nn.Module, example: torch.Tensor, num_classes: int) -> list[ChannelUnit]:
    """The gateable channel units of a plain (not yet gated) ``model``, in Torch-Pruning's group order.

    Channels of groups without a BatchNorm have no gate and are not units; the classifier (every
    Linear with ``num_classes`` outputs) is never pruned. ``model`` is not modified.
    """
    shadow = copy.deepcopy(model)
    pruner = DepGraphPruner(shadow, example, num_classes=num_classes)
    names = {id(p): n for n, p in shadow.named_parameters()}
    modules = dict(shadow.named_modules())
    units = []
    for key, target in pruner.targets().items():
        bns: dict[str, int] = {}
        producers = []
        for s in target.producers:
            name = names[id(s.param)]
            owner = modules[name.rpartition(".")[0]]
            if isinstance(owner, nn.BatchNorm2d):
                if len(s.indices) != 1:
                    raise NotImplementedError(f"unit {key} maps to several channels of BN {name}")
                bns[name.rpartition(".")[0]] = s.indices[0]
            else:
                producers.append((name, s.dim, tuple(s.indices)))
        if bns:
            units.append(ChannelUnit(tuple(key), key[0], tuple(sorted(bns.items())), tuple(producers)))
    if not units:
        raise ValueError("the model has no BatchNorm2d channel that Gate Decorator could gate")
    return units


def remove_channels(model: nn.Module, keys: Iterable[Hashable], example: torch.Tensor) -> None:
    """Physically remove the units ``keys`` from a plain, never-pruned ``model`` (in place).

    One Torch-Pruning dependency group per unit group, pruned at the anchor's channel indices;
    every module's train/eval flag is restored (``build_dependency`` leaves the model in eval).
    """
    by_group: dict[str, list[int]] = defaultdict(list)
    for g, c in keys:
        by_group[g].append(int(c))
    if not by_group:
        return
    modes = _Modes(model)
    # Torch-Pruning traces autograd: a frozen layer (requires_grad=False, as in a tick) leaves no
    # grad_fn and would be missing from the graph.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            DG = tp.DependencyGraph().build_dependency(model, example_inputs=example[:1])
        groups = []
        for name in sorted(by_group):
            anchor = model.get_submodule(name)
            group = DG.get_pruning_group(
                anchor, DG.get_pruner_of_module(anchor).prune_out_channels, sorted(by_group[name])
            )
            if not DG.check_pruning_group(group):
                raise ValueError(f"removing {len(by_group[name])} channels would leave group {name!r} empty")
            groups.append(group)
        with keep_memory_format(model):
            for group in groups:
                group.prune()
    finally:
        modes.restore()
        for p in frozen:  # pruned layers hold new Parameter objects: only the survivors are refrozen
            p.requires_grad_(False)


def macs_without(skeleton: nn.Module, keys: Iterable[Hashable], example: torch.Tensor) -> int:
    """Gate Decorator's native MACs (thop default rules) of ``skeleton`` with the units ``keys`` removed.

    ``skeleton`` is a plain model of the unpruned structure (its weights do not matter); it is
    deep-copied, never modified.
    """
    shadow = copy.deepcopy(skeleton)
    remove_channels(shadow, keys, example)
    return thop_default_macs_params(shadow, example[:1])[0]
