"""Self-Rectifying: the release criteria C_rate, C_len and the release rule (docs/method.md section 4).

All functions here are vectorised over the targets (one tensor element per target). Per step,
:func:`record_pre` reads the segment sums the criteria need from before the optimizer update, and
:func:`rectify_step` evaluates them on the decaying targets at the decay step after it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Hashable

import torch

from .log import QUANTILES
from .packing import RowPack
from .segments import pre_step_sums, segment_sum
from .tables import DecayTable, FamilyTable

__all__ = [
    "RectifyConfig",
    "C_RATE_FORMS",
    "c_rate",
    "c_len",
    "release_rule",
    "PreStep",
    "record_pre",
    "grad_sq",
    "rectify_step",
    "unpack_check",
]

Grad = Callable[[int], "torch.Tensor | None"]  # registry position -> the raw loss gradient (or None)

C_RATE_FORMS = ("radial", "relative", "per_step")
_RULES = ("and", "or")
_BUDGETS = ("base", "strict")


@dataclass(frozen=True)
class RectifyConfig:
    """Self-rectifying settings. ``None`` instead of a config turns SR off (+SP).

    Args:
        t_rate: threshold T_rate on C_rate (in the units of ``c_rate_form``); the default 0 asks
            only that the loss push the norm back up. ``inf`` never fires.
        t_len: threshold T_len on C_len (1.0: gradient at least the family mean).
        c_rate_form: ``radial`` (default, ``-alpha <g, e> / Ls``), ``relative``
            (``(||x~|| - ||x||) / ||x||``) or ``per_step`` (``(||x~|| - ||x||) / Ls``).
        release_rule: ``and`` (both criteria above threshold) or ``or``.
        release_cooldown: a released target is excluded from the base method's candidates while
            ``round < release_round + release_cooldown``; 1 = the rest of the current round. It is
            at least 1: a released target is never re-admitted in the round it was released in.
        budget: ``base`` (no substitute) or ``strict`` (the controller asks its ``replacement``
            callback for the next-least-important structures and admits them at once).
    """

    t_rate: float = 0.0
    t_len: float = 1.0
    c_rate_form: str = "radial"
    release_rule: str = "and"
    release_cooldown: int = 1
    budget: str = "base"

    def __post_init__(self) -> None:
        for name in ("t_rate", "t_len"):
            v = float(getattr(self, name))
            if math.isnan(v) or v < 0:
                raise ValueError(f"RectifyConfig.{name} must be >= 0 (inf disables), got {v}")
            object.__setattr__(self, name, v)
        if self.c_rate_form not in C_RATE_FORMS:
            raise ValueError(f"c_rate_form must be one of {C_RATE_FORMS}, got {self.c_rate_form!r}")
        if self.release_rule not in _RULES:
            raise ValueError(f"release_rule must be one of {_RULES}, got {self.release_rule!r}")
        if self.budget not in _BUDGETS:
            raise ValueError(f"budget must be one of {_BUDGETS}, got {self.budget!r}")
        if int(self.release_cooldown) != self.release_cooldown or self.release_cooldown < 1:
            raise ValueError(
                f"release_cooldown must be an integer >= 1 (1 = rest of the round), got {self.release_cooldown}"
            )
        object.__setattr__(self, "release_cooldown", int(self.release_cooldown))

    def to_dict(self) -> dict:
        """Plain-dict form (recorded in run configs and in the controller's state_dict)."""
        return asdict(self)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # A zero denominator (zero vector, zero family gradient) carries no evidence: report 0.
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def c_rate(
    form: str,
    *,
    norm_before: torch.Tensor,
    norm_after: torch.Tensor,
    step_length: torch.Tensor,
    lr_grad_dot_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """C_rate per target.

    Args:
        form: one of :data:`C_RATE_FORMS`.
        norm_before: ``||x||`` before the optimizer update.
        norm_after: ``||x~||`` after the optimizer update (before the decay projection).
        step_length: ``Ls = L0 / N``.
        lr_grad_dot_x: ``sum_p alpha_p <g_p, x_p>`` over the target's producer slices (radial).
    """
    if form == "radial":
        if lr_grad_dot_x is None:
            raise ValueError("radial C_rate needs lr_grad_dot_x")
        # -alpha <g, x/||x||> / Ls: the loss's radial push per step, in decay-step units.
        return _safe_div(-lr_grad_dot_x, norm_before * step_length)
    if form == "relative":
        return _safe_div(norm_after - norm_before, norm_before)
    if form == "per_step":
        return _safe_div(norm_after - norm_before, step_length)
    raise ValueError(f"c_rate form must be one of {C_RATE_FORMS}, got {form!r}")


def c_len(
    grad_norm: torch.Tensor,
    family: torch.Tensor,
    counted: torch.Tensor,
    num_families: int,
) -> torch.Tensor:
    """C_len for every registered target: ``||g_t|| / mean_{j in family(t), counted} ||g_j||``.

    Args:
        grad_norm: ``||g_j||`` per registered target.
        family: family id (0..num_families-1) per registered target.
        counted: which targets enter the family mean (the non-pruned ones; decaying included).
        num_families: number of family ids.
    """
    w = counted.to(grad_norm.dtype)
    total = torch.zeros(num_families, dtype=grad_norm.dtype, device=grad_norm.device)
    total.index_add_(0, family, grad_norm * w)
    count = torch.zeros_like(total).index_add_(0, family, w)
    mean = _safe_div(total, count)
    return _safe_div(grad_norm, mean.index_select(0, family))


def release_rule(rate: torch.Tensor, length: torch.Tensor, config: RectifyConfig) -> torch.Tensor:
    """Boolean release decision per target (strict ``>``: an infinite threshold never fires)."""
    hit_rate = rate > config.t_rate
    hit_len = length > config.t_len
    return hit_rate & hit_len if config.release_rule == "and" else hit_rate | hit_len


@dataclass
class PreStep:
    """What Self-Rectifying reads from before the optimizer update.

    Attributes:
        xx: ``||x||^2`` per decay-table row.
        gx: ``sum_p alpha_p <g_p, x_p>`` per decay-table row (radial C_rate only, else None).
        gg: ``||g||^2`` per family-table row.
        grad: where the gradients were read (read again when the family table changes mid-step).
    """

    xx: torch.Tensor
    gx: torch.Tensor | None
    gg: torch.Tensor
    grad: Grad

    def carried(self, old_row: dict[Hashable, int], keep: list[Hashable], num_rows: int) -> PreStep | None:
        """After the decay table was rebuilt mid-step to ``keep`` + new rows (``num_rows`` in all):
        these stats on its rows, or None (no check this step) if ``keep`` are not old rows."""
        if not all(k in old_row for k in keep):
            return None  # table rebuilt from scratch mid-step: no check this step
        # Admitted mid-step: carry the kept rows' pre-update stats; new rows are not checked
        # this step (their first decay step is the next one), so zeros are placeholders.
        idx = torch.tensor([old_row[k] for k in keep], dtype=torch.long, device=self.xx.device)
        pad = torch.zeros(num_rows - len(keep), dtype=torch.float64, device=self.xx.device)
        self.xx = torch.cat([self.xx.index_select(0, idx), pad])
        if self.gx is not None:
            self.gx = torch.cat([self.gx.index_select(0, idx), pad])
        return self


def grad_sq(families: FamilyTable, grad: Grad, device: torch.device) -> torch.Tensor:
    """``||g||^2`` per family-table row."""

    def g_g(pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        g = grad(pos)
        return None if g is None else (g, g)

    return segment_sum(families.plan, g_g, torch.float64, device)


def record_pre(
    form: str,
    families: FamilyTable,
    decays: DecayTable,
    params: list[torch.Tensor],
    grad: Grad,
    lr_of: Callable[[int], float] | None,
    device: torch.device,
    pack: RowPack | None = None,
) -> PreStep:
    """The pre-update sums of one step (``lr_of``: the learning rate per position, radial C_rate
    only; ``pack``: where the parameters are packed, see :mod:`dpm.core.packing`)."""
    fused = pre_step_sums(
        families.plan,
        decays.plan,
        [params[pos] for pos, _ in families.plan.entries],
        [grad(pos) for pos, _ in families.plan.entries],
        torch.float64,
        lr_of,
        pack,
    )
    if fused is not None:  # CPU: one concatenation of x and one of g serve all three sums
        xx, gx, gg = fused
        return PreStep(xx, gx, gg, grad)
    xx = segment_sum(decays.plan, lambda pos: (params[pos], params[pos]), torch.float64, device, pack=pack)
    gx = None
    if form == "radial":

        def g_x(pos: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            g = grad(pos)
            return None if g is None else (g, params[pos])

        gx = segment_sum(decays.plan, g_x, torch.float64, device, weights=lr_of)
    return PreStep(xx, gx, grad_sq(families, grad, device), grad)


def rectify_step(
    config: RectifyConfig,
    pre: PreStep,
    decays: DecayTable,
    families: FamilyTable,
    *,
    norm_after: torch.Tensor,
    n: torch.Tensor,
    due: torch.Tensor,
    factor: torch.Tensor,
    quantiles: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Self-Rectifying at one decay step of the decay table's rows.

    Args:
        norm_after: ``||x~||`` per row; n: the decay step per row; due: rows decaying this step;
        factor: the projection factor per row; quantiles: the :data:`dpm.core.QUANTILES` levels.

    Returns:
        ``factor`` with released rows' set to 1, the rows checked, and for the host: the
        quantiles of C_rate and of C_len over the checked rows (NaN when none was), then C_rate,
        C_len and the row of each released row.
    """
    check = due & (n < decays.N)  # every decay step except the last
    rate = c_rate(
        config.c_rate_form,
        norm_before=pre.xx.sqrt(),
        norm_after=norm_after,
        step_length=decays.L0 / decays.N,
        lr_grad_dot_x=pre.gx,
    )
    lens = c_len(pre.gg.sqrt(), families.family, families.counted, families.num_families).index_select(
        0, decays.to_family
    )
    release = check & release_rule(rate, lens, config)
    # A released target skips this step's projection: it keeps x~.
    factor = torch.where(release, 1.0, factor)
    nan = torch.full_like(rate, math.nan)
    released_rows = release.nonzero().flatten()
    # Both quantile sets from one call (one sort of a (2, rows) stack, per row as two calls give).
    quantiled = torch.nanquantile(torch.where(check, torch.stack([rate, lens]), nan), quantiles, dim=1)
    pack = [
        quantiled.t().reshape(-1),
        rate.index_select(0, released_rows),
        lens.index_select(0, released_rows),
        released_rows.to(torch.float64),
    ]
    return factor, check, pack


def unpack_check(host: list[float]) -> tuple[dict[str, dict[str, float]], list[tuple[int, float, float]]]:
    """Read the host copy of :func:`rectify_step`'s pack: the C_rate and C_len percentiles for the
    step's record (empty when no row was checked), and ``(row, C_rate, C_len)`` per released row."""
    q = len(QUANTILES)
    rq, lq = host[:q], host[q : 2 * q]
    rest = host[2 * q :]
    m = len(rest) // 3
    percentiles = {} if math.isnan(rq[0]) else {"c_rate": dict(zip(QUANTILES, rq)), "c_len": dict(zip(QUANTILES, lq))}
    released = [(int(row), rate, length) for rate, length, row in zip(rest[:m], rest[m : 2 * m], rest[2 * m :])]
    return percentiles, released
