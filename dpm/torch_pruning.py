"""DPM for any Torch-Pruning pruner: :class:`SmoothPruner` turns ``pruner.step()``'s one-step removal
into Smooth Pruning (an N-step decay to zero while training goes on), with optional Self-Rectifying.

Three lines change in a Torch-Pruning loop (README "Use DPM with Torch-Pruning")::

    smooth = SmoothPruner(pruner, optimizer, N=50)   # pruner: any tp.pruner.BasePruner, as built
    ...
    smooth.step()                                    # where the loop called pruner.step()
    ...
    smooth.optimizer_step()                          # where the loop called optimizer.step()

``smooth.step()`` asks the wrapped pruner what its next step would remove (Torch-Pruning's own
selection, run on the live model without changing it) and starts the decay of those channels;
``smooth.optimizer_step()`` steps the optimizer, decays, checks releases (Self-Rectifying) and
removes the channels that reached zero with Torch-Pruning's own functions, the optimizer's state
sliced alike (not reset). With N = 1 a step removes exactly what ``pruner.step()`` removes.

Channels are keyed ``(root_module_name, original_channel_index)``: the group's root layer (the one
Torch-Pruning ranks from) and the channel's index in it as built, so keys survive removals.

This module also holds what the suite's DepGraph base shares with it: the parameter slices of a
Torch-Pruning group (:func:`group_slices`) and removal with the optimizer state sliced alike
(:func:`prune_groups`).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterable

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tpf

from dpm.core import DecayController, RectifyConfig, Slice, Target
from dpm.models import keep_memory_format

__all__ = ["SmoothPruner", "group_slices", "prune_groups", "sliced_params"]

Key = tuple[str, int]
_STATE_VERSION = 1
_AFFINE = (tp.ops.TORCH_BATCHNORM, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)


def _is_depthwise(m: nn.Module) -> bool:
    # Torch-Pruning's own test (DependencyGraph.get_pruning_group): such a conv's channel is one
    # filter of its own, removed with the channel it reads, so it is a producer row.
    return isinstance(m, tp.ops.TORCH_CONV) and m.groups == m.out_channels and m.out_channels > 1


# ---------------------------------------------------------------------------------- group slices
def sliced_params(dep: Any) -> list[tuple[torch.Tensor, int, bool]]:
    """``(param, dim, consumer)`` for each parameter a Torch-Pruning dependency's handler slices.

    Producer slices (``consumer=False``) make a channel's output: conv/linear rows and biases,
    depthwise filters, per-channel affine parameters (BN must be in x, or train-mode BN
    renormalises away any scaling of the conv rows), unwrapped parameters; consumer slices read
    it: the input columns of the next conv/linear layer.
    """
    m, fn = dep.target.module, dep.handler
    if isinstance(m, nn.Parameter):  # an unwrapped parameter (e.g. a ViT's position embedding)
        return [(m, dep.target.pruning_dim, False)]
    if not isinstance(m, nn.Module):
        return []
    params = [p for p in m.parameters(recurse=False)]
    if not params:
        return []  # Torch-Pruning's dummy nodes (add, reshape, ...) and parameter-free layers
    if isinstance(m, tp.ops.TORCH_CONV):
        transposed = bool(getattr(m, "transposed", False))
        if _is_depthwise(m):
            return [(m.weight, 0, False)] + ([(m.bias, 0, False)] if m.bias is not None else [])
        if fn == tpf.prune_conv_out_channels:
            return [(m.weight, 1 if transposed else 0, False)] + ([(m.bias, 0, False)] if m.bias is not None else [])
        if fn == tpf.prune_conv_in_channels:
            if m.groups > 1:
                raise NotImplementedError(f"grouped (non-depthwise) convolution {m} is not supported")
            return [(m.weight, 0 if transposed else 1, True)]
    elif isinstance(m, nn.Linear):
        if fn == tpf.prune_linear_out_channels:
            return [(m.weight, 0, False)] + ([(m.bias, 0, False)] if m.bias is not None else [])
        if fn == tpf.prune_linear_in_channels:
            return [(m.weight, 1, True)]
    elif isinstance(m, _AFFINE):
        return [(p, 0, False) for p in params if p.dim() == 1 and p.numel() > 1]
    raise NotImplementedError(
        f"cannot describe {type(m).__name__} pruned by {getattr(fn, '__name__', fn)} as producer/consumer slices"
    )


def group_slices(group: Any, include_consumers: bool = False) -> dict[int, list[Slice]]:
    """Per root channel index of a Torch-Pruning group, the parameter slices that channel owns."""
    out: dict[int, list[Slice]] = defaultdict(list)
    for j, (dep, idxs) in enumerate(group):
        for param, dim, consumer in sliced_params(dep):
            if consumer and not include_consumers:
                continue
            by_channel: dict[int, list[int]] = defaultdict(list)
            for i, r in zip(idxs, group[j].root_idxs):
                if r is not None:
                    by_channel[int(r)].append(int(i))
            for c, rows in by_channel.items():
                out[c].append(Slice(param, dim, tuple(rows), consumer=consumer))
    return out


# ---------------------------------------------------------------------------------- removal
def prune_groups(model: nn.Module, groups: Iterable[Any], optimizer: torch.optim.Optimizer | None = None) -> None:
    """``group.prune()`` for each Torch-Pruning group in order, the optimizer's state sliced alike.

    ``groups`` may be a generator that derives each group after the previous one is pruned (as
    ``pruner.step()`` does). With ``optimizer``, the same optimizer object keeps working: its param
    groups list the new parameters and every parameter-shaped state tensor (SGD momentum, Adam
    moments, ...) is sliced with the very handlers and indices that slice the parameter; scalar
    state such as Adam's ``step`` is kept. A channels_last model stays channels_last.
    """
    names = {m: n for n, m in model.named_modules()}
    old_params = dict(model.named_parameters())
    shadows = _optimizer_shadows(model, optimizer, old_params) if optimizer is not None else {}
    shadow_modules = {k: dict(s.named_modules()) for k, (s, _) in shadows.items()}
    with keep_memory_format(model):
        for group in groups:
            for dep, idxs in group:
                m = dep.target.module
                if not isinstance(m, nn.Module) or m not in names or not list(m.parameters(recurse=False)):
                    continue
                for modules in shadow_modules.values():
                    # Exactly what Dependency.__call__ does, on the shadow's copy of the layer.
                    dep.handler.__self__.pruning_dim = dep.target.pruning_dim
                    dep.handler(modules[names[m]], list(idxs))
            group.prune()
    if optimizer is not None:
        _rebind_optimizer(model, optimizer, old_params, shadows)


def _optimizer_shadows(
    model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]
) -> dict[str, tuple[nn.Module, set[str]]]:
    """Per state name (``momentum_buffer``, ``exp_avg``, ...), a copy of the model whose parameters
    hold that state tensor, and the names of the parameters that have it.

    Only parameter-shaped tensors are shadowed. ``deepcopy``'s memo swaps each parameter for its
    state tensor (or a view of the weight where there is none), so no weight is copied and the
    handlers that slice the model slice the state identically.
    """
    per_state: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, p in params.items():
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape:
                per_state[k][name] = v
    shadows: dict[str, tuple[nn.Module, set[str]]] = {}
    for k, tensors in per_state.items():
        memo: dict[int, Any] = {}
        for name, p in params.items():
            memo[id(p)] = nn.Parameter(tensors.get(name, p).detach(), requires_grad=False)
        shadows[k] = (copy.deepcopy(model, memo), set(tensors))
    return shadows


def _rebind_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    old_params: dict[str, nn.Parameter],
    shadows: dict[str, tuple[nn.Module, set[str]]],
) -> None:
    """Point ``optimizer`` at the pruned parameters and give them their sliced state."""
    new_params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in old_params.items()}
    sliced = {k: dict(s.named_parameters()) for k, (s, _) in shadows.items()}
    for group in optimizer.param_groups:
        group["params"] = [new_params[name_of[id(p)]] if id(p) in name_of else p for p in group["params"]]
    new_state: dict[torch.Tensor, Any] = {}
    for p, state in optimizer.state.items():
        name = name_of.get(id(p))
        if name is None or new_params[name] is p:  # not the model's, or not pruned
            new_state[p] = state
            continue
        new_state[new_params[name]] = {
            k: sliced[k][name].detach() if k in shadows and name in shadows[k][1] else v for k, v in state.items()
        }
    optimizer.state.clear()
    optimizer.state.update(new_state)


# ---------------------------------------------------------------------------------- SmoothPruner
class SmoothPruner:
    """Smooth Pruning (+ Self-Rectifying) around an already-built Torch-Pruning pruner.

    Args:
        pruner: a ``tp.pruner.BasePruner`` (``MagnitudePruner``, ``BNScalePruner``,
            ``GroupNormPruner``, ...) with whatever importance, ratios, ``global_pruning``,
            ``isomorphic``, ``ignored_layers``, ``round_to`` and ``iterative_steps`` it was given.
        optimizer: the optimizer that trains ``pruner.model``; :meth:`optimizer_step` steps it.
        N: decay length in optimizer steps (``interval`` = 1); N = 1 is the wrapped pruner exactly.
        rectify: a :class:`dpm.core.RectifyConfig` to turn Self-Rectifying on (``budget="strict"``
            replaces each released channel by the next-least-important one of its group).
        interval, schedule, include_consumers, track: as in :class:`dpm.core.DecayController`.
        on_remove: called after every physical removal, for what a Torch-Pruning loop does after
            ``pruner.step()`` (e.g. a ViT's ``attn.num_heads = pruner.num_heads[attn.qkv]``).

    ``step()`` may be called once the previous selection is gone (:attr:`done`), as Torch-Pruning
    computes each step's selection on the model as the previous step left it.
    """

    def __init__(
        self,
        pruner: Any,
        optimizer: torch.optim.Optimizer,
        N: int,
        *,
        rectify: RectifyConfig | None = None,
        interval: int = 1,
        schedule: str = "linear",
        include_consumers: bool = False,
        track: int | None = 8,
        on_remove: Callable[[], None] | None = None,
    ) -> None:
        if not isinstance(pruner, tp.pruner.BasePruner):
            raise TypeError(
                f"SmoothPruner wraps a Torch-Pruning pruner (tp.pruner.BasePruner: MagnitudePruner, BNScalePruner, "
                f"GroupNormPruner, ...), got {type(pruner).__name__}: build one with tp.pruner.<Name>(model, ...)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.pruner, self.model, self.DG = pruner, pruner.model, pruner.DG
        self.optimizer = optimizer
        self.on_remove = on_remove
        self.include_consumers = bool(include_consumers)
        strict = rectify is not None and rectify.budget == "strict"
        self.controller = DecayController(
            self.model,
            N,
            interval=interval,
            schedule=schedule,
            rectify=rectify,
            include_consumers=include_consumers,
            optimizer=optimizer,
            replacement=self.replacement if strict else None,
            track=track,
        )
        self._roots: dict[str, tuple[Any, Any]] = {}  # root name -> (its layer, the pruning function)
        self._ids: dict[str, list[int]] = {}  # root name -> original index of each current channel
        self._batch: list[str] = []  # roots of the selection awaiting removal, in selection order
        self._checked: tuple[int, ...] | None = None
        self._check_optimizer()

    # ------------------------------------------------------------------ the two calls
    @property
    def done(self) -> bool:
        """No decay in flight and nothing waiting for removal: ``step()`` may select again."""
        return not self._batch and not self.controller.decaying

    def step(self) -> list[Key]:
        """Start the decay of what ``pruner.step()`` would remove now; returns the channels' keys.

        The selection is Torch-Pruning's own (``pruner.step(interactive=True)`` on the live model,
        which stays unchanged); channels released by Self-Rectifying and still cooling down are
        left out of it. With N = 1 they are removed at once, as ``pruner.step()`` removes them.
        """
        if not self.done:
            raise RuntimeError(
                f"step(): {len(self.controller.decaying)} channels of the previous selection are still decaying: "
                "call step() once smooth.done (N optimizer steps after the last step())"
            )
        self.controller.start_round()
        excluded = self.controller.candidates_excluded()
        chosen: list[Target] = []
        for group in list(self.pruner.step(interactive=True)):
            root, fn = group[0].dep.target.module, group[0].dep.handler
            name = self._root_name(root, fn)
            ids = self._ids[name]
            positions = sorted(int(i) for i in group[0].idxs)
            keep = [p for p in positions if (name, ids[p]) not in excluded]
            if not keep:
                continue
            if keep != positions:
                group = self._group(name, keep)
                if not self.DG.check_pruning_group(group):
                    continue
            slices = group_slices(group, self.include_consumers)
            chosen.extend(Target((name, ids[c]), name, tuple(slices[c])) for c in keep)
            if self.controller.rectify is not None:  # C_len's family: every channel of the group
                self.controller.register(self.candidates(name).values())
            if name not in self._batch:
                self._batch.append(name)
        self.controller.admit(chosen)
        self._remove_if_done()
        return [t.key for t in chosen]

    def optimizer_step(self) -> Any:
        """``optimizer.step()`` with the decay around it; removes what reached zero."""
        self._check_optimizer()
        out = self.controller.step(self.optimizer)
        self._remove_if_done()
        return out

    # ------------------------------------------------------------------ channels
    def _root_name(self, root: Any, fn: Any) -> str:
        """The name of a group's root: its layer's name, ``:in`` appended where Torch-Pruning ranks
        the group from the layer's input channels (attention groups, rooted at the projection).
        Its channel ids start on first sight, before any of its channels is removed (only
        SmoothPruner removes)."""
        out = self.DG.is_out_channel_pruning_fn(fn)
        name = self.DG._module2name[root] + ("" if out else ":in")
        if name not in self._roots:
            self._roots[name] = (root, fn)
            width = self.DG.get_out_channels(root) if out else self.DG.get_in_channels(root)
            self._ids[name] = list(range(width))
        return name

    def _group(self, name: str, positions: list[int]) -> Any:
        """The Torch-Pruning group of root ``name`` at its current channel ``positions``."""
        root, fn = self._roots[name]
        return self.DG.get_pruning_group(root, fn, positions)

    def candidates(self, root_name: str | None = None) -> dict[Hashable, Target]:
        """Every channel of the groups selected so far (or of ``root_name``'s), by key."""
        out: dict[Hashable, Target] = {}
        for name in [root_name] if root_name is not None else list(self._ids):
            ids = self._ids[name]
            slices = group_slices(self._group(name, list(range(len(ids)))), self.include_consumers)
            out.update(((name, ids[c]), Target((name, ids[c]), name, tuple(s))) for c, s in slices.items())
        return out

    def replacement(self, released: list[Target], excluded: frozenset) -> list[Target]:
        """``budget=strict``: per released channel, the least important free channel of its group
        by the wrapped pruner's own importance."""
        out: list[Target] = []
        taken = set(excluded) | {t.key for t in released}
        # Per family once per call (the weights do not change within it): keys by importance, and
        # the family's targets; several channels of one group are often released together.
        ranked: dict[str, tuple[list[Key], dict[Hashable, Target]] | None] = {}
        for t in released:
            name = t.family
            if name not in ranked:
                ids = self._ids[name]
                imp = self.pruner.estimate_importance(self._group(name, list(range(len(ids)))))
                if imp is None or len(imp) != len(ids):
                    ranked[name] = None  # no per-channel score for this group (e.g. channel groups)
                else:
                    order = torch.argsort(imp.detach().cpu(), stable=True).tolist()
                    ranked[name] = ([(name, ids[c]) for c in order], self.candidates(name))
            if ranked[name] is None:
                continue  # no substitute
            keys, targets = ranked[name]
            key = next((k for k in keys if k not in taken), None)
            if key is not None:
                taken.add(key)
                out.append(targets[key])
        return out

    def _remove_if_done(self) -> None:
        """Remove the selection's zeroed channels once none of it decays any more."""
        if not self._batch or self.controller.decaying:
            return
        pruned = self.controller.pruned
        plan: list[tuple[str, list[int]]] = []
        for name in self._batch:
            positions = [p for p, orig in enumerate(self._ids[name]) if (name, orig) in pruned]
            if positions:
                plan.append((name, positions))

        def groups() -> Iterable[Any]:
            # Each group derived after the previous one is pruned, as pruner.step() does.
            for name, positions in plan:
                yield self._group(name, positions)

        prune_groups(self.model, groups(), self.optimizer)
        for name, positions in plan:
            for p in reversed(positions):
                del self._ids[name][p]
        self.controller.forget(pruned)
        self.controller.bind(self.model)
        self._batch = []
        self._checked = None
        if self.on_remove is not None:
            self.on_remove()

    def _check_optimizer(self) -> None:
        # Checked again whenever the optimizer object or the model's parameters change (a removal).
        params = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        if (id(self.optimizer),) + params == self._checked:
            return
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = sum(1 for p in params if p not in held)
        if missing:
            raise ValueError(
                f"the optimizer does not hold {missing} of the model's {len(params)} trainable parameters: "
                "give SmoothPruner the optimizer that trains pruner.model"
            )
        self._checked = (id(self.optimizer),) + params

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The DPM side (controller, channel ids, pending selection) and the pruner's step count.
        The pruned structure itself is Torch-Pruning's ``pruner.pruning_history()``."""
        return {
            "version": _STATE_VERSION,
            "controller": self.controller.state_dict(),
            "ids": {k: list(v) for k, v in self._ids.items()},
            "batch": list(self._batch),
            "current_step": self.pruner.current_step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` onto a SmoothPruner over a model of the same structure."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"SmoothPruner state version {state.get('version')!r}, expected {_STATE_VERSION}")
        self._ids = {k: list(v) for k, v in state["ids"].items()}
        self._roots = {}
        for name in self._ids:
            layer = self.DG.model.get_submodule(name.removesuffix(":in"))
            fns = self.DG.get_pruner_of_module(layer)
            self._roots[name] = (layer, fns.prune_in_channels if name.endswith(":in") else fns.prune_out_channels)
        self._batch = list(state["batch"])
        self.pruner.current_step = int(state["current_step"])
        self.controller.bind(self.model)
        self.controller.load_state_dict(state["controller"])
        self._checked = None
