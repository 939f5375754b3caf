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

The run-side stage (DHSPG phase, removal, fine-tune) is dpm.stages.otov2.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpm.core import DecayController, Target
from dpm.pruners.otov2_groups import _CONV, ZeroInvariantGroup, zero_invariant_groups, zigs_of

log = logging.getLogger(__name__)

__all__ = [
    "VARIANT_DEFAULTS",
    "WEIGHT_DECAY_TYPES",
    "ZeroInvariantGroup",
    "DHSPG",
    "zero_invariant_groups",
    "zigs_of",
    "remove_zero_groups",
]

#: only_train_once 2.0.16 ``optimizer/hyperparameter.py``: what ``None`` means per variant.
VARIANT_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {
        "first_momentum": 0.0,
        "second_momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "lmbda": 1e-3,
        "lmbda_amplify": 2,
        "hat_lmbda_coeff": 10,
    },
    "adam": {
        "first_momentum": 0.9,
        "second_momentum": 0.999,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "lmbda": 1e-2,
        "lmbda_amplify": 20,
        "hat_lmbda_coeff": 1e3,
    },
    "adamw": {
        "first_momentum": 0.9,
        "second_momentum": 0.999,
        "dampening": 0.0,
        "weight_decay": 1e-2,
        "lmbda": 1e-2,
        "lmbda_amplify": 20,
        "hat_lmbda_coeff": 1e3,
    },
}
WEIGHT_DECAY_TYPES = ("l2_norm", "l1_norm")
_SAFE_GUARD = 1e-8  # 2.0.16's safe_guard: x / (||x|| + 1e-8) and the Adam denominator
_STATE_VERSION = 1


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
        defaults = dict(
            lr=float(lr),
            lmbda=pick(lmbda, "lmbda"),
            lmbda_amplify=pick(lmbda_amplify, "lmbda_amplify"),
            hat_lmbda_coeff=pick(hat_lmbda_coeff, "hat_lmbda_coeff"),
            epsilon=float(epsilon),
            weight_decay=pick(weight_decay, "weight_decay"),
            first_momentum=pick(first_momentum, "first_momentum"),
            second_momentum=pick(second_momentum, "second_momentum"),
            dampening=pick(dampening, "dampening"),
            group_divisible=int(group_divisible),
        )
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
        denom = (v / (1.0 - b2**t)).sqrt().add_(_SAFE_GUARD)
        return m / (1.0 - b1**t) / denom

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
            zscores = scores[start : start + C]
            in_top = int(top[start : start + C].sum())
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
        zig_groups = self.param_groups[: len(self.zigs)]
        xs: list[torch.Tensor | None] = [None] * len(self.zigs)
        ds: list[torch.Tensor | None] = [None] * len(self.zigs)
        if not self.partitioned and t - 1 == self.partition_step:
            xs = [z.gather(z.params) for z in self.zigs]
            ds = [z.gather([grads[p] for p in z.params]) for z in self.zigs]
            self.partition(xs, ds)

        for group in self.param_groups[len(self.zigs) :]:  # type default: plain base step
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
                    lam_adj = torch.clip(
                        group["lmbda_amplify"] * lower,
                        min=group["lmbda"],
                        max=group["lmbda"] * group["hat_lmbda_coeff"],
                    )
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

    def _half_space_rows(
        self, hat_x: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor, gp: torch.Tensor, epsilon: float, i: int
    ) -> torch.Tensor | None:
        """Row mask of the G_p groups the half-space projection zeroes (L373-391); rows admitted to
        the decay are never projected again. None when the ZIG's G_p is at its sparsity cap."""
        proj = gp & (torch.sum(hat_x * x, dim=1) < epsilon * x_norm**2) & ~self.admitted[i]
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
        new = releases[self.released_seen :]
        for rec in new:
            i, r = self._row_of[rec["key"]]
            self.penalized[i][r] = False
        self.released_seen = len(releases)
        if new and self.controller.rectify is not None and self.controller.rectify.budget == "base":
            total = sum(z.num_groups for z in self.zigs)
            deficit = math.ceil(self.target_group_sparsity * total - 1e-9) - sum(int(m.sum()) for m in self.penalized)
            if deficit > 0:
                self.promote([None] * deficit, excluded={rec["key"] for rec in releases})

    def candidates(self) -> dict[Hashable, Target]:
        """Every group of every ZIG, as the controller's target (the stage registers them all)."""
        return {t.key: t for z in self.zigs for t in z.targets}

    def replacement(self, released: Sequence[Target], excluded: frozenset) -> list[Target]:
        """The controller's ``budget=strict`` callback: :meth:`promote`."""
        return self.promote(released, excluded)

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
        return {
            "num_groups": total,
            "num_zigs": len(self.zigs),
            "zero_groups": zero,
            "group_sparsity": zero / total,
            "g_p_size": int(sum(int(m.sum()) for m in self.penalized)),
            "partitioned": self.partitioned,
            "dhspg_steps": self.num_steps,
            "promoted": self.promoted,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus DHSPG's own (step count, partition, admissions)."""
        state = super().state_dict()
        state["dhspg"] = {
            "version": _STATE_VERSION,
            "num_steps": self.num_steps,
            "partitioned": self.partitioned,
            "penalized": [m.cpu().clone() for m in self.penalized],
            "scores": None if self.scores is None else [s.cpu().clone() for s in self.scores],
            "admitted": [m.cpu().clone() for m in self.admitted],
            "released_seen": self.released_seen,
            "promoted": self.promoted,
            "group_sparsity": self.group_sparsity,
            "zigs": [z.name for z in self.zigs],
        }
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
