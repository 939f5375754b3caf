"""OTOv2 (Chen et al., ICLR 2023) as a DPM base pruner: DHSPG on Torch-Pruning's dependency groups.

The original code is only_train_once 2.0.16 (an ONNX-based graph, ``.cuda()`` hard-coded, ONNX
output). This module re-implements its optimizer, DHSPG, line by line after
``docs/otov2-dhspg.md`` section 4 (line numbers ``L...`` below refer to 2.0.16's
``optimizer/dhspg.py``) on the *producer side* of each Torch-Pruning dependency group, which
coincides one to one with OTOv2's zero-invariant groups (ZIGs) on VGG16-BN and ResNet-56: conv
and linear output rows (weight and bias) and BN weight and bias, never the consumers' input
columns and never BN buffers. ``tests/test_otov2_parity.py`` checks it against the original.

Vocabulary: a *ZIG* is one dependency group (one torch param_group of :class:`DHSPG`); a *group*
is one row of a ZIG (one channel), the structure OTOv2 zeroes and DPM decays. Sparsity and the
"target reached" switch are decided from the group vectors.

DPM (docs/method.md section 6): with a :class:`dpm.core.DecayController` attached, the half-space
projection's immediate zeroing (L390 / L388) admits the groups to the controller instead, decay
step 1 applied to the trial point in that very step, so N = 1 is the base method bit for bit.
Decaying groups are never projected again and count with the zero groups toward the target
sparsity; at zero they are the controller's pruned (masked) slices and DHSPG's fixed zeros. A group
that Self-Rectifying releases leaves G_p for good (OTOv2 chooses G_p once); with ``budget=strict``
the best-scoring group of G_np is promoted to G_p in its place.

C_rate (decision): the controller reads the raw loss gradient ``param.grad``, not DHSPG's
gradient variant, so C_rate sees neither the lambda penalty nor weight decay nor momentum.
lambda x/||x|| is OTOv2's own push toward zero: it would add -alpha*lambda_g*N/L0 to the radial
C_rate of every decaying group, a negative bias that grows as lambda adapts, so SR would rarely
release; the question SR asks is whether the *loss* defends the group.

Stage (``run_stage``): DHSPG trains the model for ``pruner.train`` (from scratch in OTOv2's
recipe: ``trainer.pretrain.epochs=0``), the zero groups are removed with Torch-Pruning (consumers
included), the pruned ``nn.Module`` is saved, measured and fine-tuned with ``trainer.finetune``
when its epochs are > 0 (0 in OTOv2's recipe, which trains once).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpm.core import DecayController, Target

log = logging.getLogger(__name__)

__all__ = ["VARIANT_DEFAULTS", "ZeroInvariantGroup", "DHSPG", "zero_invariant_groups", "ControllerHook",
           "run_stage", "validate_config"]

#: only_train_once 2.0.16 ``optimizer/hyperparameter.py``: what ``None`` means per variant.
VARIANT_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"first_momentum": 0.0, "second_momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
            "lmbda": 1e-3, "lmbda_amplify": 2, "hat_lmbda_coeff": 10},
    "adam": {"first_momentum": 0.9, "second_momentum": 0.999, "dampening": 0.0, "weight_decay": 0.0,
             "lmbda": 1e-2, "lmbda_amplify": 20, "hat_lmbda_coeff": 1e3},
    "adamw": {"first_momentum": 0.9, "second_momentum": 0.999, "dampening": 0.0, "weight_decay": 1e-2,
              "lmbda": 1e-2, "lmbda_amplify": 20, "hat_lmbda_coeff": 1e3},
}
WEIGHT_DECAY_TYPES = ("l2_norm", "l1_norm")
_SAFE_GUARD = 1e-8  # 2.0.16's safe_guard: x / (||x|| + 1e-8) and the Adam denominator
_STATE_VERSION = 1
# 2.0.16's group types; only the two that DHSPG updates row-wise occur here.
_LINEAR, _CONV = 4, 5


# ---------------------------------------------------------------------------------------------- groups
@dataclass
class _Producer:
    param: nn.Parameter
    dim: int
    index: torch.Tensor | None  # None: the rows are the param's dim-0 rows in order (a plain view)
    per_row: int                # indices along ``dim`` per group


class ZeroInvariantGroup:
    """One ZIG: ``num_groups`` rows, row ``i`` the concatenation of every producer's slice ``i``.

    Built from :class:`dpm.core.Target` objects of one family (one per channel, same producer
    parameters in the same order), which also name the rows (``keys[i]``) for the decay controller.
    """

    def __init__(self, name: str, targets: Sequence[Target], linear: bool = False) -> None:
        if not targets:
            raise ValueError(f"ZIG {name!r} has no groups")
        self.name = name
        self.keys: list[Hashable] = [t.key for t in targets]
        self.targets: list[Target] = list(targets)
        first = targets[0].producers
        self.producers: list[_Producer] = []
        for j, s in enumerate(first):
            rows: list[int] = []
            for t in targets:
                ps = t.producers
                if len(ps) != len(first) or ps[j].param is not s.param or ps[j].dim != s.dim \
                        or len(ps[j].indices) != len(s.indices):
                    raise NotImplementedError(f"ZIG {name!r}: channels slice different parameters")
                rows.extend(ps[j].indices)
            p = s.param
            size = p.shape[s.dim] if p.dim() > 0 else 1
            if sorted(rows) != list(range(size)):
                raise NotImplementedError(
                    f"ZIG {name!r} covers {len(rows)} of the {size} rows of a {tuple(p.shape)} parameter along dim "
                    f"{s.dim}: DHSPG needs every producer row in exactly one group")
            identity = s.dim == 0 and rows == list(range(size)) and len(s.indices) == 1
            index = None if identity else torch.tensor(rows, dtype=torch.long, device=p.device)
            self.producers.append(_Producer(p, s.dim, index, len(s.indices)))
        self.num_groups = len(targets)
        # 2.0.16 counts linear and conv ZIGs in separate float32 buckets (see compute_group_sparsity).
        self.group_type = _LINEAR if linear else _CONV

    @property
    def params(self) -> list[nn.Parameter]:
        """The producer parameters, in row-concatenation order."""
        return [p.param for p in self.producers]

    def gather(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ``[num_groups, n]`` group matrix of ``tensors`` (one per producer, parameter-shaped)."""
        cols = []
        for pr, t in zip(self.producers, tensors):
            if pr.index is None:
                cols.append(t.reshape(self.num_groups, -1))
            else:
                cols.append(t.index_select(pr.dim, pr.index).movedim(pr.dim, 0).reshape(self.num_groups, -1))
        return torch.cat(cols, dim=1)

    def row_norms(self, tensors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """L2 norm of every row, from each producer's rows in place (no group matrix is built)."""
        sq = None
        for pr, t in zip(self.producers, self.params if tensors is None else tensors):
            rows = t.reshape(self.num_groups, -1) if pr.index is None else \
                t.index_select(pr.dim, pr.index).movedim(pr.dim, 0).reshape(self.num_groups, -1)
            n = torch.linalg.vector_norm(rows, dim=1)
            sq = n * n if sq is None else sq + n * n
        return sq.sqrt()

    def zero_rows(self, mask: torch.Tensor) -> None:
        """Set the rows in ``mask`` (bool, one per group) to exactly zero in every producer."""
        for pr in self.producers:
            p = pr.param
            if pr.index is None:
                p.data.masked_fill_(mask.view(-1, *[1] * (p.dim() - 1)), 0.0)
            else:
                idx = pr.index.view(self.num_groups, pr.per_row)[mask].flatten()
                p.data.index_fill_(pr.dim, idx, 0.0)

    def scatter(self, matrix: torch.Tensor) -> None:
        """Write a group matrix back into the producer parameters (2.0.16's ``update_xs``)."""
        left = 0
        for pr in self.producers:
            p = pr.param
            width = p.numel() // self.num_groups
            block = matrix[:, left:left + width]
            left += width
            if pr.index is None:
                p.data.copy_(block.reshape(p.shape))
            else:
                moved = list(p.shape)
                moved.insert(0, moved.pop(pr.dim))
                p.data.index_copy_(pr.dim, pr.index, block.reshape(moved).movedim(0, pr.dim))


def zero_invariant_groups(model: nn.Module, example_inputs: torch.Tensor,
                          num_classes: int) -> tuple[list["ZeroInvariantGroup"], Any]:
    """The ZIGs of ``model`` from Torch-Pruning's dependency groups (classifier ignored).

    Returns ``(zigs, pruner)``: the pruner (a :class:`dpm.pruners.DepGraphPruner`) names the groups'
    channels ``(group_name, channel)`` and removes them physically at the end.
    """
    from dpm.pruners.depgraph import DepGraphPruner

    pruner = DepGraphPruner(model, example_inputs, num_classes=num_classes, iterative_steps=1)
    return zigs_of(pruner), pruner


def zigs_of(pruner) -> list["ZeroInvariantGroup"]:
    """One ZIG per dependency group of ``pruner`` (families of its targets), sorted by name."""
    linear = {id(p) for m in pruner.model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    families: dict[Hashable, list[Target]] = {}
    for t in pruner.targets().values():
        families.setdefault(t.family, []).append(t)
    zigs = [ZeroInvariantGroup(str(f), ts, linear=any(id(s.param) in linear for s in ts[0].producers))
            for f, ts in sorted(families.items(), key=lambda kv: str(kv[0]))]
    seen: set[int] = set()
    for z in zigs:
        for p in z.params:
            if id(p) in seen:
                raise NotImplementedError(f"parameter {tuple(p.shape)} is a producer of two ZIGs")
            seen.add(id(p))
    return zigs


# ---------------------------------------------------------------------------------------------- DHSPG
class DHSPG(torch.optim.Optimizer):
    """Dual Half-Space Projected Gradient, as only_train_once 2.0.16 computes it.

    Args:
        zigs: the zero-invariant groups (each becomes one param_group; its rows are penalised,
            projected and counted).
        other_params: parameters in no ZIG (e.g. the classifier), updated with the plain base step.
        lr: step size alpha (schedulers change each param_group's ``lr``).
        variant: ``sgd`` (heavy ball), ``adam`` or ``adamw``.
        lmbda, lmbda_amplify, hat_lmbda_coeff, first_momentum, second_momentum, dampening,
            weight_decay: None takes the variant default (:data:`VARIANT_DEFAULTS`). Weight decay
            is coupled L2 (added to the gradient) for sgd and adam; decoupled for adamw only.
        weight_decay_type: ``l2_norm`` or ``l1_norm``; read only by adamw (as in 2.0.16).
        epsilon: the half-space threshold.
        target_group_sparsity: penalty and projection stop once reached.
        tolerance_group_sparsity: enlarges the G_p budget K = (target + tolerance) * groups.
        start_pruning_steps: partition step and first projection step.
        partition_step, half_space_project_steps: used only if both are given.
        warm_up_steps: before this step count lambda is fixed and there is no projection.
        group_divisible: q, the rounding of each ZIG's G_np size.
        fixed_zero_groups: keep exactly-zero groups at zero.
        upper_group_sparsity: per-ZIG cap of 2.0.16's projection (1.0 there: inactive).
        controller: a :class:`dpm.core.DecayController` over the same parameters for +SP / +SR
            (None: the projection zeroes, the base method).

    Attributes:
        group_sparsity: the sparsity at the end of the last step (decaying groups counted as zero
            when a controller is attached), 2.0.16's ``curr_group_sparsity``.
        last_lambdas: per ZIG name, the lambda of each row in the last penalising step (tests).
    """

    def __init__(
        self,
        zigs: Sequence[ZeroInvariantGroup],
        other_params: Iterable[nn.Parameter] = (),
        *,
        lr: float = 0.1,
        variant: str = "sgd",
        lmbda: float | None = None,
        lmbda_amplify: float | None = None,
        hat_lmbda_coeff: float | None = None,
        epsilon: float = 0.0,
        weight_decay: float | None = None,
        weight_decay_type: str = "l2_norm",
        first_momentum: float | None = None,
        second_momentum: float | None = None,
        dampening: float | None = None,
        target_group_sparsity: float = 0.5,
        tolerance_group_sparsity: float = 0.05,
        start_pruning_steps: int = 0,
        partition_step: int | None = None,
        half_space_project_steps: int | None = None,
        warm_up_steps: int = 0,
        group_divisible: int = 1,
        fixed_zero_groups: bool = True,
        upper_group_sparsity: float = 1.0,
        controller: DecayController | None = None,
    ) -> None:
        if variant not in VARIANT_DEFAULTS:
            raise ValueError(f"variant must be one of {tuple(VARIANT_DEFAULTS)}, got {variant!r}")
        if weight_decay_type not in WEIGHT_DECAY_TYPES:
            raise ValueError(f"weight_decay_type must be one of {WEIGHT_DECAY_TYPES}, got {weight_decay_type!r}")
        if not lr >= 0:
            raise ValueError(f"invalid learning rate {lr}")
        if int(group_divisible) != group_divisible or group_divisible < 1:
            raise ValueError(f"group_divisible must be an integer >= 1, got {group_divisible}")
        if start_pruning_steps < 0:
            raise ValueError(f"start_pruning_steps must be >= 0, got {start_pruning_steps}")
        d = VARIANT_DEFAULTS[variant]
        pick = lambda v, k: float(d[k]) if v is None else float(v)  # noqa: E731
        if partition_step is None or half_space_project_steps is None:
            partition_step = half_space_project_steps = int(start_pruning_steps)
        self.partition_step, self.half_space_project_steps = int(partition_step), int(half_space_project_steps)
        self.variant = variant
        self.weight_decay_type = weight_decay_type
        self.target_group_sparsity = float(target_group_sparsity)
        self.tolerance_group_sparsity = float(tolerance_group_sparsity)
        self.warm_up_steps = int(warm_up_steps)
        self.fixed_zero_groups = bool(fixed_zero_groups)
        self.upper_group_sparsity = float(upper_group_sparsity)
        self.zigs = list(zigs)
        defaults = dict(lr=float(lr), lmbda=pick(lmbda, "lmbda"), lmbda_amplify=pick(lmbda_amplify, "lmbda_amplify"),
                        hat_lmbda_coeff=pick(hat_lmbda_coeff, "hat_lmbda_coeff"), epsilon=float(epsilon),
                        weight_decay=pick(weight_decay, "weight_decay"),
                        first_momentum=pick(first_momentum, "first_momentum"),
                        second_momentum=pick(second_momentum, "second_momentum"),
                        dampening=pick(dampening, "dampening"), group_divisible=int(group_divisible))
        groups: list[dict[str, Any]] = [{"params": z.params, "zig": z.name} for z in self.zigs]
        in_zig = {id(p) for z in self.zigs for p in z.params}
        others = [p for p in other_params if id(p) not in in_zig]
        if others:
            groups.append({"params": others, "zig": None})
        super().__init__(groups, defaults)
        self.controller = controller
        self.num_steps = 0
        self.partitioned = False
        # Per ZIG: G_p membership, partition scores, and rows ever admitted to the decay (never
        # projected again: decaying, pruned, or released and out of G_p anyway).
        self.penalized = [torch.zeros(z.num_groups, dtype=torch.bool, device=z.params[0].device) for z in self.zigs]
        self.scores: list[torch.Tensor] | None = None
        self.admitted = [torch.zeros_like(m) for m in self.penalized]
        self.released_seen = 0
        self.promoted = 0
        self.last_lambdas: dict[str, torch.Tensor] = {}
        self._row_of = {k: (i, r) for i, z in enumerate(self.zigs) for r, k in enumerate(z.keys)}
        self.group_sparsity = self.compute_group_sparsity()

    # ------------------------------------------------------------------ gradient variant (L242-268)
    @torch.no_grad()
    def _grad_variant(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        delta = g.detach().clone()
        if self.variant != "adamw":  # coupled L2 for sgd and adam (L252-253)
            delta += group["weight_decay"] * p
        state = self.state[p]
        b1, b2 = group["first_momentum"], group["second_momentum"]
        if self.variant == "sgd":
            if b1 > 0 or group["dampening"] > 0:
                delta = self._moment(state, "momentum_buffer", b1, group["dampening"], delta)
            return delta
        t = self.num_steps
        m = self._moment(state, "exp_avg", b1, b1, delta)
        if b2 > 0:
            if "exp_avg_sq" not in state:
                v = state["exp_avg_sq"] = delta * delta
            else:
                v = state["exp_avg_sq"]
                v.mul_(b2).add_(delta * delta, alpha=1.0 - b2)
        else:
            v = delta * delta
        denom = (v / (1.0 - b2 ** t)).sqrt().add_(_SAFE_GUARD)
        return m / (1.0 - b1 ** t) / denom

    @staticmethod
    def _moment(state: dict, key: str, momentum: float, dampening: float, grad: torch.Tensor) -> torch.Tensor:
        # 2.0.16 starts the buffer at the gradient itself (not (1 - dampening) * gradient).
        if momentum > 0:
            if key not in state:
                state[key] = grad
                return grad
            buf = state[key]
            buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
            return buf
        return grad

    # ------------------------------------------------------------------ partition (L163-240)
    @torch.no_grad()
    def partition(self, xs: list[torch.Tensor], ds: list[torch.Tensor]) -> None:
        """Split every ZIG into G_p (penalised) and G_np, once, from the current x and d."""
        cos = [F.cosine_similarity(-x, -d) for x, d in zip(xs, ds)]
        avg = [torch.norm(x, dim=1) / (x.shape[1] if x.dim() > 1 else 1) for x in xs]
        total = sum(z.num_groups for z in self.zigs)
        K = int(total * min(self.target_group_sparsity + self.tolerance_group_sparsity, 0.999))
        scores = 0.5 * F.normalize(torch.cat(cos), dim=0) + 0.5 * F.normalize(1.0 / (torch.cat(avg) + 1e-6), dim=0)
        top = torch.zeros(total, dtype=torch.bool, device=scores.device)
        top[torch.topk(scores, K).indices] = True
        self.scores = []
        start = 0
        for i, (z, group) in enumerate(zip(self.zigs, self.param_groups)):
            C, q = z.num_groups, group["group_divisible"]
            zscores = scores[start:start + C]
            in_top = int(top[start:start + C].sum())
            start += C
            mask = torch.zeros(C, dtype=torch.bool, device=zscores.device)
            if C > q:
                n_np = int(max(round((C - in_top) / q), 1) * q)
                # 2.0.16 would fail in topk when q's rounding exceeds C; keep all of them in G_np then.
                n_np = min(n_np, C)
                mask[:] = True
                mask[torch.topk(-zscores, n_np).indices] = False
            self.penalized[i] = mask
            self.scores.append(zscores.clone())
        self.partitioned = True

    # ------------------------------------------------------------------ step (L277-371)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: C901
        """One DHSPG step (with the DPM decay when a controller is attached)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ctl = self.controller
        if ctl is not None:
            ctl.before_step(self)  # x and the raw loss gradient, before anything moves
        self.num_steps += 1
        t = self.num_steps
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                grads[p] = self._grad_variant(group, p)
        zig_groups = self.param_groups[:len(self.zigs)]
        xs: list[torch.Tensor | None] = [None] * len(self.zigs)
        ds: list[torch.Tensor | None] = [None] * len(self.zigs)
        if not self.partitioned and t - 1 == self.partition_step:
            xs = [z.gather(z.params) for z in self.zigs]
            ds = [z.gather([grads[p] for p in z.params]) for z in self.zigs]
            self.partition(xs, ds)

        for group in self.param_groups[len(self.zigs):]:  # type default: plain base step
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.variant == "adamw":
                    p.add_(group["weight_decay"] * p, alpha=-group["lr"])
                p.add_(grads[p], alpha=-group["lr"])

        reached = self.group_sparsity >= self.target_group_sparsity
        to_admit: list[Target] = []
        fixed = t > self.half_space_project_steps or self.fixed_zero_groups  # L363-365
        for i, (z, group) in enumerate(zip(self.zigs, zig_groups)):
            lr = group["lr"]
            gp = self.penalized[i]
            penalise = self.partitioned and not reached and bool(gp.any())  # host sync only while penalising
            if not penalise and self.variant != "adamw":
                # Nothing row-wise this step: the same arithmetic (x - lr * d, then the fixed zeros)
                # per parameter in place, without building the group matrices.
                zero = z.row_norms() == 0.0 if fixed else None
                for q in z.params:
                    q.sub_(lr * grads[q])
                # On a GPU an all-False fill is cheaper than the host sync of asking first.
                if zero is not None and (zero.is_cuda or bool(zero.any())):
                    z.zero_rows(zero)
                continue
            x = xs[i] if xs[i] is not None else z.gather(z.params)
            d = ds[i] if ds[i] is not None else z.gather([grads[q] for q in z.params])
            hat_x = x - lr * d
            x_norm = torch.norm(x, p=2, dim=1)
            if self.variant == "adamw":
                if self.weight_decay_type == "l2_norm":
                    hat_x = hat_x - lr * group["weight_decay"] * x
                else:
                    hat_x = hat_x - lr * group["weight_decay"] * x / (x_norm + _SAFE_GUARD).unsqueeze(1)
            if penalise:
                lam = torch.ones_like(x_norm) * group["lmbda"]
                if t >= self.warm_up_steps:
                    d_norm = torch.norm(d, p=2, dim=1)
                    inner = torch.sum(x * d, dim=1)
                    adj = gp & (inner < 0)
                    lower = -inner[adj] / x_norm[adj]
                    upper = -(d_norm[adj] * d_norm[adj] * x_norm[adj] / inner[adj])
                    lam_adj = torch.clip(group["lmbda_amplify"] * lower, min=group["lmbda"],
                                         max=group["lmbda"] * group["hat_lmbda_coeff"])
                    over = lam_adj >= upper
                    lam_adj[over] = (upper[over] + lower[over]) / 2.0
                    lam[adj] = lam_adj
                # L347-351 on every row at once: the G_np rows get a coefficient of exactly 0 (and
                # x / (||x|| + 1e-8) is 0 on zero rows), so each G_p element sees 2.0.16's arithmetic.
                coef = (lr * lam) * gp.to(lam.dtype)
                hat_x -= coef.unsqueeze(1) * (x / (x_norm + _SAFE_GUARD).unsqueeze(1))
                self.last_lambdas[z.name] = lam
                if t >= self.warm_up_steps and t >= self.half_space_project_steps:
                    proj = self._half_space_rows(hat_x, x, x_norm, gp, group["epsilon"], i)
                    if proj is not None and bool(proj.any()):
                        if ctl is None:
                            hat_x.masked_fill_(proj.unsqueeze(1), 0.0)  # L390 / L388: the abrupt zeroing
                        else:
                            self.admitted[i] |= proj
                            to_admit.extend(z.targets[r] for r in proj.nonzero().flatten().tolist())
            if fixed:
                hat_x.masked_fill_((x_norm == 0.0).unsqueeze(1), 0.0)
            z.scatter(hat_x)

        if ctl is not None:
            # The live parameters now hold the trial point: decay step 1 on it, then steps 2..N of
            # earlier admissions, releases and the pruned masks, all inside this step.
            ctl.admit(to_admit)
            ctl.after_step(self)
            self._take_releases()
        self.group_sparsity = self.compute_group_sparsity()
        return loss

    def _half_space_rows(self, hat_x: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor, gp: torch.Tensor,
                         epsilon: float, i: int) -> torch.Tensor | None:
        """Row mask of the G_p groups the half-space projection zeroes (L373-391); rows admitted to
        the decay are never projected again. None when the ZIG's G_p is at its sparsity cap."""
        proj = gp & (torch.sum(hat_x * x, dim=1) < epsilon * x_norm ** 2) & ~self.admitted[i]
        if self.upper_group_sparsity >= 1.0:
            # The cap cannot bind (a zero row never meets the strict condition): no host syncs.
            return proj
        n = int(gp.sum())
        zero = x_norm == 0
        if not float((zero & gp).sum()) / n < self.upper_group_sparsity:
            return None
        trial = float(((proj | zero) & gp).sum()) / n
        if trial > self.upper_group_sparsity:  # 2.0.16's arithmetic kept (its size looks inverted)
            cap = min(max(0, int(n * (trial - self.upper_group_sparsity))), n - 1)
            cand = proj.nonzero().flatten()
            keep = cand[torch.randperm(cand.numel())[:cap].sort()[0].to(cand.device)]
            proj = torch.zeros_like(proj)
            proj[keep] = True
        return proj

    def _take_releases(self) -> None:
        """Self-Rectifying released groups leave G_p for good (OTOv2 chooses G_p once). With
        budget=base, G_p is refilled by score only as far as the target needs: OTOv2's own
        selection keeps its target reachable (strict already replaced each one)."""
        releases = self.controller.log.releases
        new = releases[self.released_seen:]
        for rec in new:
            i, r = self._row_of[rec["key"]]
            self.penalized[i][r] = False
        self.released_seen = len(releases)
        if new and self.controller.rectify is not None and self.controller.rectify.budget == "base":
            total = sum(z.num_groups for z in self.zigs)
            deficit = math.ceil(self.target_group_sparsity * total - 1e-9) - sum(int(m.sum()) for m in self.penalized)
            if deficit > 0:
                self.promote([None] * deficit, excluded={rec["key"] for rec in releases})

    def promote(self, released: Sequence[Target], excluded: Iterable[Hashable] = ()) -> list[Target]:
        """Per released group, the best-scoring G_np group joins G_p (``budget=strict``; with
        ``budget=base`` only as many as the target needs).

        Candidates keep every ZIG at >= q non-penalised groups (2.0.16's guarantee) and are neither
        zero nor ever admitted. Returns [] (nothing is admitted at once: a promoted group is
        penalised and projected like any G_p group). The controller calls this from its
        ``replacement`` callback.
        """
        if self.scores is None:
            return []
        excluded = set(excluded)
        for _ in released:
            best: tuple[float, int, int] | None = None
            for i, (z, group) in enumerate(zip(self.zigs, self.param_groups)):
                free = ~self.penalized[i] & ~self.admitted[i]
                if int((~self.penalized[i]).sum()) <= group["group_divisible"]:
                    continue
                norms = torch.norm(z.gather(z.params), dim=1)
                free &= norms > 0
                for r in free.nonzero().flatten().tolist():
                    if z.keys[r] in excluded:
                        continue
                    s = float(self.scores[i][r])
                    if best is None or s > best[0]:
                        best = (s, i, r)
            if best is None:
                break
            self.penalized[best[1]][best[2]] = True
            self.promoted += 1
        return []

    # ------------------------------------------------------------------ sparsity (L393-440)
    @torch.no_grad()
    def group_norms(self) -> list[torch.Tensor]:
        """Per ZIG, the L2 norm of every group vector (current parameters)."""
        return [z.row_norms() for z in self.zigs]

    def compute_group_sparsity(self) -> float:
        """(zero groups [+ decaying groups]) / (groups + 6e-6), in float32 as 2.0.16 computes it."""
        total = torch.zeros(6) + 1e-6
        zero = torch.zeros(6)
        # One device->host transfer for all ZIGs.
        counts = torch.stack([torch.sum(z.row_norms() == 0.0) for z in self.zigs]).tolist()
        for z, c in zip(self.zigs, counts):
            total[z.group_type] += z.num_groups
            zero[z.group_type] += c
        if self.controller is not None:
            zero[_CONV] += self.controller.counts()["decaying"]
        return float(torch.sum(zero) / torch.sum(total))

    def zero_groups(self) -> list[list[int]]:
        """Per ZIG, the rows whose group vector is exactly zero."""
        return [(n == 0).nonzero().flatten().tolist() for n in self.group_norms()]

    def summary(self) -> dict[str, Any]:
        """Counts for metrics.json: groups, G_p size, zero groups and sparsity."""
        zero = sum(len(r) for r in self.zero_groups())
        total = sum(z.num_groups for z in self.zigs)
        return {"num_groups": total, "num_zigs": len(self.zigs), "zero_groups": zero,
                "group_sparsity": zero / total, "g_p_size": int(sum(int(m.sum()) for m in self.penalized)),
                "partitioned": self.partitioned, "dhspg_steps": self.num_steps, "promoted": self.promoted}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus DHSPG's own (step count, partition, admissions)."""
        state = super().state_dict()
        state["dhspg"] = {"version": _STATE_VERSION, "num_steps": self.num_steps, "partitioned": self.partitioned,
                          "penalized": [m.cpu().clone() for m in self.penalized],
                          "scores": None if self.scores is None else [s.cpu().clone() for s in self.scores],
                          "admitted": [m.cpu().clone() for m in self.admitted],
                          "released_seen": self.released_seen, "promoted": self.promoted,
                          "group_sparsity": self.group_sparsity, "zigs": [z.name for z in self.zigs]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` onto a DHSPG built over the same ZIGs."""
        state_dict = dict(state_dict)
        own = state_dict.pop("dhspg")
        if own.get("version") != _STATE_VERSION or own["zigs"] != [z.name for z in self.zigs]:
            raise ValueError("DHSPG checkpoint does not match this optimizer's ZIGs")
        super().load_state_dict(state_dict)
        dev = [m.device for m in self.penalized]
        self.num_steps, self.partitioned = int(own["num_steps"]), bool(own["partitioned"])
        self.penalized = [m.to(d) for m, d in zip(own["penalized"], dev)]
        self.admitted = [m.to(d) for m, d in zip(own["admitted"], dev)]
        self.scores = None if own["scores"] is None else [s.to(d) for s, d in zip(own["scores"], dev)]
        self.released_seen, self.promoted = int(own["released_seen"]), int(own["promoted"])
        self.group_sparsity = float(own["group_sparsity"])


# ---------------------------------------------------------------------------------------------- stage
class ControllerHook:
    """Training-loop hook that puts the decay controller into the phase checkpoint (DHSPG drives
    the controller from inside its own step) and exposes it for per-step logging.

    With ``evaluate`` it also records the test top-1 right before the step that starts pruning
    (``start_step`` DHSPG steps done): OTOv2 trains from scratch, so the accuracy before the stage
    is chance level and this is the meaningful "before pruning" number.
    """

    def __init__(self, controller: DecayController, evaluate: Callable[[], float] | None = None,
                 start_step: int = 0) -> None:
        self.controller = controller
        self.evaluate, self.start_step = evaluate, start_step
        self.top1_at_start: float | None = None

    def step_start(self, optimizer: torch.optim.Optimizer) -> None:
        if self.evaluate is not None and self.top1_at_start is None and \
                getattr(optimizer, "num_steps", None) == self.start_step:
            self.top1_at_start = self.evaluate()

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "top1_at_start": self.top1_at_start}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.top1_at_start = state.get("top1_at_start")


def dhspg_kwargs(p: Any) -> dict[str, Any]:
    """DHSPG's keyword arguments from a ``pruner`` config node (steps resolved by the caller)."""
    keys = ("variant", "lmbda", "lmbda_amplify", "hat_lmbda_coeff", "epsilon", "weight_decay", "weight_decay_type",
            "first_momentum", "second_momentum", "dampening", "target_group_sparsity", "tolerance_group_sparsity",
            "partition_step", "half_space_project_steps", "warm_up_steps", "group_divisible", "fixed_zero_groups")
    return {k: p[k] for k in keys}


def start_pruning_step(p: Any, iters_per_epoch: int) -> int:
    """``start_pruning_epochs`` (when set) in optimizer steps of the DHSPG phase, else ``start_pruning_steps``."""
    if p.start_pruning_epochs is not None:
        return int(round(p.start_pruning_epochs * iters_per_epoch))
    return int(p.start_pruning_steps)


def run_stage(ctx) -> dict:
    """OTOv2 with DPM (docs/method.md section 6): DHSPG training, physical removal, optional fine-tune.

    ``dpm=base`` runs the same path with N = 1 (the controller zeroes and masks at admission: the
    base method bit for bit), so the three variants differ only in the decay.
    """
    from dpm.checkpoint import atomic_write_json, save_pruned_model
    from dpm.core import resolve_decay_steps
    from dpm.errors import UserError
    from dpm.run import CHECKPOINT, decay_log, model_build_spec, rectify_config

    cfg, p, d = ctx.cfg, ctx.cfg.pruner, ctx.cfg.dpm
    model = ctx.model
    zigs, pruner = zero_invariant_groups(model, ctx.example, cfg.dataset.num_classes)
    ctx.mark_before_prune()
    loader = ctx.phase_loader("dhspg", p.train.batch_size)
    iters = len(loader)
    start = start_pruning_step(p, iters)
    total = iters * p.train.epochs
    if start >= total:
        raise UserError(f"pruner.start_pruning_steps: pruning would start at step {start}, after the "
                        f"{total} steps of pruner.train: lower it or raise pruner.train.epochs")
    try:
        N = 1 if d.variant == "base" else resolve_decay_steps(
            N=d.N, N_epochs=None if d.N is not None else d.N_epochs, iters_per_epoch=iters,
            iters_left=total - start)
    except ValueError as err:
        raise UserError(f"dpm.N: {err}") from None
    rectify = rectify_config(d)
    holder: dict[str, DHSPG] = {}
    controller = DecayController(
        model, N, interval=d.interval, schedule=d.schedule, rectify=rectify, include_consumers=d.include_consumers,
        replacement=lambda released, excluded: holder["opt"].promote(released, excluded), track=d.track)
    # Every group is a family member from the start (C_len compares with the whole ZIG).
    controller.register(t for z in zigs for t in z.targets)
    kwargs = dhspg_kwargs(p)
    in_zig = {id(q) for z in zigs for q in z.params}

    def make_optimizer(m: nn.Module, pcfg: Any) -> DHSPG:
        opt = DHSPG(zigs, [q for q in m.parameters() if id(q) not in in_zig], lr=pcfg.lr,
                    start_pruning_steps=start, controller=controller, **kwargs)
        holder["opt"] = opt
        return opt

    hook = ControllerHook(controller, lambda: ctx.evaluate("test")[0], start)
    summary = ctx.run_phase("dhspg", ctx.run_dir / CHECKPOINT, hooks=[hook], phase_cfg=p.train, loader=loader,
                            optimizer_factory=make_optimizer)
    summary["phase"] = "dhspg"
    opt = holder["opt"]
    out: dict[str, Any] = {"N": N, "start_pruning_step": start, "top1_at_pruning_start": hook.top1_at_start,
                           "target_group_sparsity": p.target_group_sparsity}
    out.update(opt.summary())
    out["decaying_at_end"] = controller.counts()["decaying"]
    counts = controller.counts()
    out.update(admitted=counts["decaying"] + counts["pruned"] + counts["releases_total"],
               released=counts["releases_total"])
    atomic_write_json(ctx.run_dir / "dpm_log.json", decay_log(controller))

    # Physical removal of the zero groups (consumers included), decided from the group vectors.
    removal = remove_zero_groups(model, pruner, opt, ctx.eval_loaders["test"])
    out.update(removal)
    out["target_met"] = out["group_sparsity"] >= p.target_group_sparsity
    out["native_speedup"] = pruner.base_native[0] / pruner.native_macs_params()[0]
    # Weights plus structure, not a pickled module: loading it (load_pruned_model) runs no code.
    save_pruned_model(ctx.run_dir / "pruned_model.pt", model, model_build_spec(cfg), removed=removal["removed_groups"])
    out["pruned_model"] = str(ctx.run_dir / "pruned_model.pt")
    out["stage_epochs"] = {"dhspg": p.train.epochs, "finetune": cfg.trainer.finetune.epochs}
    # metrics["history"] holds pretrain and finetune only (dpm.run): the DHSPG epochs go here.
    out["dhspg_history"] = summary["history"]
    out["final_phase"] = summary
    if cfg.trainer.finetune.epochs > 0:
        out["top1_after_dhspg"], _ = ctx.evaluate("test")
        ft = ctx.run_phase("finetune", ctx.run_dir / "finetune_last.pt")
        ft["phase"] = "finetune"
        out["final_phase"] = ft
    return out


@torch.no_grad()
def remove_zero_groups(model: nn.Module, pruner, opt: DHSPG, loader) -> dict[str, Any]:
    """Remove every exactly-zero group with Torch-Pruning; check the eval-mode outputs on one batch.

    A ZIG whose every group is zero keeps one (zero) channel: Torch-Pruning cannot empty a layer,
    and a zero channel computes nothing the next layer sees.
    """
    keys: list[Hashable] = []
    kept_empty = 0
    for z, rows in zip(opt.zigs, opt.zero_groups()):
        if len(rows) == z.num_groups:
            rows = rows[1:]
            kept_empty += 1
        keys.extend(z.keys[r] for r in rows)
    x = next(iter(loader))[0]
    was_training = model.training
    model.eval()
    before = model(x)
    pruner.remove(keys)
    after = model(x)
    model.train(was_training)
    diff = float((before - after).abs().max())
    if not diff <= 1e-4 * max(1.0, float(before.abs().max())):
        raise RuntimeError(f"removing {len(keys)} zero groups changed the outputs by {diff}")
    return {"removed_groups": len(keys), "removal_max_abs_diff": diff, "zigs_kept_one_zero_channel": kept_empty}


def validate_config(cfg: Any, fail: Callable[[str, Any, str], None]) -> None:
    """Semantic checks of the ``pruner`` keys (dpm.config.validate calls this for pruner=otov2)."""
    p = cfg.pruner
    if p.variant not in VARIANT_DEFAULTS:
        fail("pruner.variant", p.variant, f"valid: {', '.join(VARIANT_DEFAULTS)}")
    if p.weight_decay_type not in WEIGHT_DECAY_TYPES:
        fail("pruner.weight_decay_type", p.weight_decay_type, f"valid: {', '.join(WEIGHT_DECAY_TYPES)}")
    if not 0 < p.target_group_sparsity < 1:
        fail("pruner.target_group_sparsity", p.target_group_sparsity, "must be in (0, 1)")
    if not p.tolerance_group_sparsity >= 0:
        fail("pruner.tolerance_group_sparsity", p.tolerance_group_sparsity, "must be >= 0")
    for key in ("lmbda", "lmbda_amplify", "hat_lmbda_coeff", "weight_decay", "dampening"):
        if p[key] is not None and not p[key] >= 0:
            fail(f"pruner.{key}", p[key], "must be >= 0 (or null for the variant default)")
    for key in ("first_momentum", "second_momentum"):
        if p[key] is not None and not 0 <= p[key] < 1:
            fail(f"pruner.{key}", p[key], "must be in [0, 1) (or null for the variant default)")
    if not 0 <= p.epsilon < 1:
        fail("pruner.epsilon", p.epsilon, "the half-space threshold must be in [0, 1)")
    if p.group_divisible < 1:
        fail("pruner.group_divisible", p.group_divisible, "must be >= 1")
    for key in ("start_pruning_steps", "warm_up_steps"):
        if p[key] < 0:
            fail(f"pruner.{key}", p[key], "must be >= 0")
    if p.start_pruning_epochs is not None and not p.start_pruning_epochs >= 0:
        fail("pruner.start_pruning_epochs", p.start_pruning_epochs, "must be >= 0 (or null to use start_pruning_steps)")
    for key in ("partition_step", "half_space_project_steps"):
        if p[key] is not None and p[key] < 0:
            fail(f"pruner.{key}", p[key], "must be >= 0 (or null)")
    t = p.train
    if t.epochs < 1:
        fail("pruner.train.epochs", t.epochs, "DHSPG prunes while it trains: use >= 1")
    if not t.lr > 0:
        fail("pruner.train.lr", t.lr, "must be > 0")
    if t.batch_size < 1:
        fail("pruner.train.batch_size", t.batch_size, "must be >= 1")
    if t.schedule not in ("cosine", "step", "constant"):
        fail("pruner.train.schedule", t.schedule, "valid: cosine, step, constant")
    if t.mixup < 0:
        fail("pruner.train.mixup", t.mixup, "the mixup alpha must be >= 0 (0 = off)")
    if list(t.milestones) != sorted(t.milestones):
        fail("pruner.train.milestones", list(t.milestones), "must be increasing")
    for key, set_by in (("momentum", "pruner.first_momentum"), ("weight_decay", "pruner.weight_decay")):
        if t[key] != 0:
            fail(f"pruner.train.{key}", t[key], f"DHSPG reads {set_by}: set pruner.train.{key}=0 and use {set_by}")
    if t.nesterov:
        fail("pruner.train.nesterov", t.nesterov, "DHSPG has no Nesterov momentum: set it to false")
