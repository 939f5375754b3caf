"""Self-Rectifying: the release criteria C_rate, C_len and the release rule (docs/method.md section 4).

All functions here are vectorised over the decaying targets (one tensor element per target); the
controller computes their inputs with segment reductions and calls them once per decay step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["RectifyConfig", "C_RATE_FORMS", "c_rate", "c_len", "release_rule"]

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
