"""DepGraph (Torch-Pruning) as a DPM base pruner (docs/method.md sections 2, 5, 6).

Torch-Pruning's recipe for CIFAR ResNet-56: group L2 magnitude (``GroupMagnitudeImportance(p=2)``),
global ranking, ``iterative_steps`` progressive steps of ``MagnitudePruner`` until the MACs
speed-up (its own ``count_ops_and_params``) reaches the target, the final classifier ignored,
optionally after sparse learning with ``GroupNormPruner``'s regulariser. DPM needs that recipe
split in two: *which* channels the base method would remove (:meth:`DepGraphPruner.select`, run
on a deep copy so the live model keeps every channel while they decay) and their physical
removal once zero (:meth:`DepGraphPruner.remove`, optimizer state sliced, not reset).

Channels are named by keys ``(group_name, original_channel_id)``: ``group_name`` is the
alphabetically first conv/linear layer whose output channels the dependency group prunes (its
*anchor*), ``original_channel_id`` the channel's index in that layer of the model as built. Keys
therefore survive removals of other channels, rounds and checkpoints.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Collection, Hashable, Iterable

import torch
import torch_pruning as tp
from torch import nn

from dpm.core import Target
from dpm.measure import torch_pruning_macs_params
from dpm.torch_pruning import group_slices, prune_groups

__all__ = ["DepGraphPruner"]

Key = tuple[str, int]

# Torch-Pruning's default group roots (BasePruner's root_module_types): every group it ranks is
# found from one of these, so targets() and select() see the same groups.
_ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM)
_STATE_VERSION = 1


class _Modes:
    """Snapshot of every module's ``training`` flag.

    Torch-Pruning 1.6.1 ``build_dependency`` switches the model to eval and leaves it there;
    building a graph mid-training would then silently train with eval-mode BatchNorm (the pilot
    diverged to NaN, docs/method.md section 10). Flags are restored per module, not with ``train()``,
    so a model with some submodules deliberately in eval keeps them so.
    """

    def __init__(self, model: nn.Module) -> None:
        self.flags = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        for m, flag in self.flags:
            m.training = flag


class DepGraphPruner:
    """DepGraph's selection and physical removal, per DPM selection round.

    Args:
        model: the live model; pruned in place by :meth:`remove`.
        example_inputs: an input batch for graph tracing and MAC counting (only the first sample
            is used: MACs are per sample, as in Torch-Pruning's CIFAR recipe).
        num_classes: size of the classifier output; the default ``ignored_layers`` is every Linear
            with that many outputs.
        iterative_steps: Torch-Pruning's progressive steps (pruning ratio 1.0 spread over them).
        global_pruning: rank channels of all groups together (Torch-Pruning's recipe) or per group.
        max_pruning_ratio: Torch-Pruning's cap on the fraction of a layer's channels removed,
            relative to the model each :meth:`select` starts from.
        ignored_layers: modules never pruned (with their submodules); default the classifier.
        sparse_learning: allow :meth:`regularize` (GroupNormPruner's regulariser, ``reg``).
        reg: the sparse-learning coefficient.
        importance_normalizer: ``GroupMagnitudeImportance``'s normalizer; Torch-Pruning 1.6's
            default ``mean`` (its newer CIFAR ``group_sl`` benchmark uses ``max``).

    Attributes:
        base_native: ``(MACs, params)`` of the model at construction, Torch-Pruning's counter.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        *,
        num_classes: int,
        iterative_steps: int = 400,
        global_pruning: bool = True,
        max_pruning_ratio: float = 1.0,
        ignored_layers: list[nn.Module] | None = None,
        sparse_learning: bool = False,
        reg: float = 5e-4,
        importance_normalizer: str | None = "mean",
    ) -> None:
        if isinstance(iterative_steps, bool) or int(iterative_steps) != iterative_steps or iterative_steps < 1:
            raise ValueError(f"iterative_steps must be an integer >= 1, got {iterative_steps!r}")
        if not 0.0 < float(max_pruning_ratio) <= 1.0:
            raise ValueError(f"max_pruning_ratio must be in (0, 1], got {max_pruning_ratio!r}")
        if float(reg) < 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.model = model
        # One sample: tracing and counting need no more, and a training batch may be passed as is.
        self.example_inputs = example_inputs[:1] if isinstance(example_inputs, torch.Tensor) else example_inputs
        self.num_classes = int(num_classes)
        self.iterative_steps = int(iterative_steps)
        self.global_pruning = bool(global_pruning)
        self.max_pruning_ratio = float(max_pruning_ratio)
        self.sparse_learning = bool(sparse_learning)
        self.reg = float(reg)
        self.importance_normalizer = importance_normalizer
        self._importance = tp.importance.GroupMagnitudeImportance(p=2, normalizer=importance_normalizer)

        names = {m: n for n, m in model.named_modules()}
        if ignored_layers is None:
            ignored_layers = [
                m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == self.num_classes
            ]
            if not ignored_layers:
                raise ValueError(
                    f"no Linear layer with out_features == num_classes ({self.num_classes}) to keep unpruned: "
                    "pass ignored_layers=[<the classifier>] explicitly"
                )
        unknown = [type(m).__name__ for m in ignored_layers if m not in names]
        if unknown:
            raise ValueError(f"ignored_layers holds modules that are not in the model: {unknown}")
        # By name, so the same layers can be found in select()'s deep copy.
        self._ignored_names = [names[m] for m in ignored_layers]

        self.DG = self._build_graph(self.model)
        # group name -> original id of each current channel of its anchor (position = current index).
        self._ids: dict[str, list[int]] = {}
        for name, group in self._groups(self.DG, self.model):
            self._ids[name] = list(range(len(group[0].idxs)))
        if not self._ids:
            raise ValueError("the model has no prunable dependency group (all layers ignored?)")
        self._history: list[list[Key]] = []
        self._regularizer: tp.pruner.GroupNormPruner | None = None
        self._native: tuple[int, int] | None = None
        self.base_native: tuple[int, int] = self.native_macs_params()

    # ------------------------------------------------------------------ graph and groups
    def _build_graph(self, model: nn.Module) -> tp.DependencyGraph:
        modes = _Modes(model)
        try:
            with torch.enable_grad():  # the tracer needs autograd even when called under no_grad
                return tp.DependencyGraph().build_dependency(model, example_inputs=self.example_inputs)
        finally:
            modes.restore()

    def _ignored(self, model: nn.Module) -> list[nn.Module]:
        modules = dict(model.named_modules())
        return [modules[n] for n in self._ignored_names]

    def _groups(self, DG: tp.DependencyGraph, model: nn.Module) -> Iterable[tuple[str, Any]]:
        """``(group_name, full group rooted at its anchor)`` for every prunable group.

        Rooting at the anchor (not at whichever layer Torch-Pruning met first) fixes the channel
        index space of a group: positions are the anchor's output channels.
        """
        ignored = [sub for m in self._ignored(model) for sub in m.modules()]
        for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=_ROOT_TYPES):
            name = self._group_name(DG, group)
            anchor = DG.model.get_submodule(name)
            n = DG.get_out_channels(anchor)
            root_n = len(group[0].idxs)
            if n != root_n:
                raise NotImplementedError(
                    f"dependency group {name!r} maps channels between layers of different widths "
                    f"({n} vs {root_n}, e.g. concat/split); DepGraphPruner supports groups of equal width only"
                )
            yield name, DG.get_pruning_group(anchor, DG.get_pruner_of_module(anchor).prune_out_channels, list(range(n)))

    @staticmethod
    def _group_name(DG: tp.DependencyGraph, group: Any) -> str:
        names = [
            DG._module2name[dep.target.module]
            for dep, _ in group
            if isinstance(dep.target.module, _ROOT_TYPES) and DG.is_out_channel_pruning_fn(dep.handler)
        ]
        return min(names)

    @staticmethod
    def _anchor_positions(DG: tp.DependencyGraph, group: Any, name: str) -> list[int]:
        """The anchor layer's channel positions that ``group`` prunes."""
        anchor = DG.model.get_submodule(name)
        for dep, idxs in group:
            if dep.target.module is anchor and DG.is_out_channel_pruning_fn(dep.handler):
                return sorted(int(i) for i in idxs)
        raise RuntimeError(f"group {name!r} does not prune its anchor's output channels")

    def _key_positions(self, keys: Iterable[Hashable]) -> dict[str, list[int]]:
        """Current positions per group of ``keys``; unknown or removed keys are an error."""
        index = {g: {orig: pos for pos, orig in enumerate(ids)} for g, ids in self._ids.items()}
        out: dict[str, set[int]] = defaultdict(set)
        for key in keys:
            try:
                g, orig = key  # type: ignore[misc]
                out[g].add(index[g][orig])
            except (KeyError, TypeError, ValueError):
                raise KeyError(
                    f"{key!r} is not a channel of the current model (removed already, or not a "
                    "(group_name, original_channel_id) key from targets())"
                ) from None
        return {g: sorted(p) for g, p in out.items()}

    # ------------------------------------------------------------------ targets
    def targets(self, include_consumers: bool = False) -> dict[Hashable, Target]:
        """Every prunable channel of the current model as a :class:`dpm.core.Target`.

        Keys are ``(group_name, original_channel_id)``; the family is ``group_name``. Producer
        slices: every output-channel slice the group removes (conv/linear rows and biases, BN
        weight and bias, depthwise conv filters): zeroing them all makes the channel's output
        exactly zero. Consumer slices (``include_consumers=True``): the input columns of the
        following conv/linear layers.
        """
        out: dict[Hashable, Target] = {}
        for name, group in self._groups(self.DG, self.model):
            ids = self._ids[name]
            per_channel = group_slices(group, include_consumers)
            for c in range(len(ids)):
                key = (name, ids[c])
                out[key] = Target(key, name, tuple(per_channel.get(c, ())))
        return out

    # ------------------------------------------------------------------ selection
    def select(self, speedup: float, excluded: Collection[Hashable] = ()) -> list[Hashable]:
        """The channels Torch-Pruning would remove to reach ``speedup``, never one in ``excluded``.

        Runs Torch-Pruning's ``MagnitudePruner`` (group L2 magnitude, ``global_pruning``,
        ``iterative_steps``, pruning ratio 1.0, ``max_pruning_ratio``) on a deep copy of the
        current model, stepping it until the copy's MACs speed-up against :attr:`base_native`
        reaches ``speedup`` or the steps run out (Torch-Pruning's progressive loop). Excluded
        channels are filtered out of each group before it is pruned in the copy, so later steps
        pick others instead. The live model is untouched.

        Returns:
            keys of the channels the copy lost, in the order Torch-Pruning removed them.
        """
        if not speedup > 0:
            raise ValueError(f"speedup must be > 0, got {speedup!r}")
        excluded = frozenset(excluded)
        base_macs = self.base_native[0]
        if base_macs / self.native_macs_params()[0] >= speedup:
            return []
        shadow = copy.deepcopy(self.model)  # its train/eval mode is of no consequence
        with torch.enable_grad():
            pruner = tp.pruner.MagnitudePruner(
                shadow,
                self.example_inputs,
                importance=self._importance,
                global_pruning=self.global_pruning,
                iterative_steps=self.iterative_steps,
                pruning_ratio=1.0,
                max_pruning_ratio=self.max_pruning_ratio,
                ignored_layers=self._ignored(shadow),
                # Fresh dicts: Torch-Pruning's defaults are shared mutable dicts that it writes to.
                in_channel_groups={},
                out_channel_groups={},
                num_heads={},
                channel_groups={},
            )
        DG = pruner.DG
        ids = {g: list(v) for g, v in self._ids.items()}
        chosen: list[Key] = []
        current = 0.0
        while current < speedup:
            for group in pruner.step(interactive=True):
                if not group[0].idxs:  # Torch-Pruning yields groups it prunes nothing of
                    continue
                name = self._group_name(DG, group)
                if name not in ids:
                    raise RuntimeError(f"Torch-Pruning yielded group {name!r} unknown to targets()")
                positions = self._anchor_positions(DG, group, name)
                keep = [p for p in positions if (name, ids[name][p]) not in excluded]
                if not keep:
                    continue
                if len(keep) != len(positions):
                    anchor = DG.model.get_submodule(name)
                    group = DG.get_pruning_group(anchor, DG.get_pruner_of_module(anchor).prune_out_channels, keep)
                    if not DG.check_pruning_group(group):
                        continue
                group.prune()
                chosen.extend((name, ids[name][p]) for p in keep)
                for p in reversed(keep):
                    del ids[name][p]
            current = base_macs / torch_pruning_macs_params(shadow, self.example_inputs)[0]
            if pruner.current_step >= pruner.iterative_steps:
                break
        return chosen

    def importance(self, keys: Collection[Hashable]) -> dict[Hashable, float]:
        """Group L2 magnitude of each key on the current weights, normalised per group exactly as
        Torch-Pruning's global ranking sees it (lower = pruned first)."""
        wanted = self._key_positions(keys)
        scores: dict[Hashable, float] = {}
        for name, group in self._groups(self.DG, self.model):
            if name not in wanted:
                continue
            imp = self._importance(group)
            for p in wanted[name]:
                scores[(name, self._ids[name][p])] = float(imp[p])
        return {k: scores[tuple(k)] for k in keys}  # type: ignore[arg-type]

    # ------------------------------------------------------------------ removal
    def remove(self, keys: Collection[Hashable], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Physically remove ``keys``' channels from the live model (Torch-Pruning ``group.prune()``).

        With ``optimizer``, the same optimizer object keeps working: its param groups list the new
        parameters and every parameter-shaped state tensor (SGD momentum, Adam moments, ...) is
        sliced with the very handlers and indices that sliced the parameter; scalar state such as
        Adam's ``step`` is kept. The dependency graph is rebuilt and every module's train/eval
        flag restored.
        """
        positions = self._key_positions(keys)
        if not positions:
            return
        groups = []
        for name in sorted(positions):
            anchor = self.model.get_submodule(name)
            group = self.DG.get_pruning_group(
                anchor, self.DG.get_pruner_of_module(anchor).prune_out_channels, positions[name]
            )
            if not self.DG.check_pruning_group(group):
                raise ValueError(f"removing {len(positions[name])} channels would leave group {name!r} empty")
            groups.append(group)
        prune_groups(self.model, groups, optimizer)
        removed: list[Key] = []
        for name in sorted(positions):
            removed.extend((name, self._ids[name][p]) for p in positions[name])
            for p in reversed(positions[name]):
                del self._ids[name][p]
        self.DG = self._build_graph(self.model)
        self._history.append(removed)
        self._regularizer = None  # its groups and importance refer to the old shapes
        self._native = None

    # ------------------------------------------------------------------ sparse learning, counts, state
    def regularize(self, model: nn.Module) -> None:
        """Sparse learning: Torch-Pruning ``GroupNormPruner``'s group regulariser (``reg``) added to
        the gradients of the current model. Call after ``loss.backward()``, before ``optimizer.step()``."""
        if not self.sparse_learning:
            raise RuntimeError("regularize() needs DepGraphPruner(..., sparse_learning=True)")
        inner = getattr(model, "_orig_mod", getattr(model, "module", model))  # torch.compile / DDP wrappers
        if model is not self.model and inner is not self.model:
            raise ValueError("regularize(model): model is not the model this pruner was built on")
        if self._regularizer is None:
            modes = _Modes(self.model)
            try:
                with torch.enable_grad():
                    self._regularizer = tp.pruner.GroupNormPruner(
                        self.model,
                        self.example_inputs,
                        importance=self._importance,
                        reg=self.reg,
                        global_pruning=self.global_pruning,
                        pruning_ratio=1.0,
                        iterative_steps=self.iterative_steps,
                        max_pruning_ratio=self.max_pruning_ratio,
                        ignored_layers=self._ignored(self.model),
                        in_channel_groups={},
                        out_channel_groups={},
                        num_heads={},
                        channel_groups={},
                    )
            finally:
                modes.restore()
        self._regularizer.regularize(self.model)

    def native_macs_params(self) -> tuple[int, int]:
        """``(MACs, params)`` of the current model with Torch-Pruning's ``count_ops_and_params``."""
        if self._native is None:
            self._native = torch_pruning_macs_params(self.model, self.example_inputs)
        return self._native

    def state_dict(self) -> dict:
        """The removal history (keys per :meth:`remove` call, in order) and the base counts."""
        return {
            "version": _STATE_VERSION,
            "removals": [list(r) for r in self._history],
            "base_native": tuple(self.base_native),
        }

    def load_state_dict(self, state: dict) -> None:
        """Replay the removals of ``state`` on this pruner's freshly built (unpruned) model, so
        that a checkpoint of the pruned model's weights then loads into it."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"DepGraphPruner state version {state.get('version')!r}, expected {_STATE_VERSION}")
        if self._history:
            raise RuntimeError(
                "load_state_dict() replays removals on an unpruned model: build a fresh model "
                "and DepGraphPruner, then load"
            )
        base = tuple(int(v) for v in state["base_native"])
        if base != tuple(self.base_native):
            raise ValueError(
                f"the checkpoint's pruner was built on a model of {base[0]} MACs / {base[1]} params, "
                f"this one has {self.base_native[0]} / {self.base_native[1]}: build the same model"
            )
        for removal in state["removals"]:
            self.remove([tuple(k) for k in removal])
