"""Decay schedules s(n) (docs/method.md section 3) and the resolution of N.

Each schedule maps a decay step n in [0, N] to the fraction of the initial norm L0 the target keeps.
All satisfy s(0) = 1 and s(N) = 0 *exactly*: the end points are forced with ``torch.where`` rather
than left to floating point (cos(pi) or exp differences need not round to exactly -1 / 0), because
bit-exact zero at n = N is what makes N = 1 the base method.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["SCHEDULES", "schedule", "resolve_decay_steps", "EXP_RATE"]

#: Rate k of the ``exp`` schedule: s(n) = (exp(-k n/N) - exp(-k)) / (1 - exp(-k)).
EXP_RATE = 5.0


def _linear(u: torch.Tensor) -> torch.Tensor:
    return 1.0 - u


def _cosine(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.cos(math.pi * u))


def _exp(u: torch.Tensor) -> torch.Tensor:
    floor = math.exp(-EXP_RATE)
    return (torch.exp(-EXP_RATE * u) - floor) / (1.0 - floor)


#: Schedule name -> function of the progress u = n / N in [0, 1].
SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": _linear,
    "cosine": _cosine,
    "exp": _exp,
}


def schedule(name: str, n: torch.Tensor | float, N: torch.Tensor | float) -> torch.Tensor:
    """s(n) for the named schedule, element-wise over tensors ``n`` and ``N`` (float64 result).

    ``linear`` is the paper's ``1 - n/N``; ``cosine`` and ``exp`` are ablations.
    """
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
    # The tensors' device, never torch's default one (a user's set_default_device must not move it);
    # plain numbers are computed on the CPU.
    device = next((t.device for t in (n, N) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    n = torch.as_tensor(n, dtype=torch.float64, device=device)
    N = torch.as_tensor(N, dtype=torch.float64, device=device)
    u = (n / N).clamp(0.0, 1.0)
    s = fn(u)
    s = torch.where(n >= N, torch.zeros_like(s), s)
    return torch.where(n <= 0, torch.ones_like(s), s)


def resolve_decay_steps(
    N: int | None = None,
    N_epochs: float | None = None,
    iters_per_epoch: int | None = None,
    iters_left: int | None = None,
) -> int:
    """The decay length in optimizer iterations.

    Give ``N`` (iterations) or ``N_epochs`` with the current phase's ``iters_per_epoch`` (which
    already reflects its batch size and world size). ``iters_left``, when given, enforces that the
    decay ends inside the phase.
    """
    if (N is None) == (N_epochs is None):
        raise ValueError("give exactly one of N (iterations) or N_epochs")
    if N_epochs is not None:
        if iters_per_epoch is None or iters_per_epoch < 1:
            raise ValueError("N_epochs needs iters_per_epoch >= 1 of the current phase")
        if not N_epochs > 0:
            raise ValueError(f"N_epochs must be > 0, got {N_epochs}")
        N = max(1, int(round(N_epochs * iters_per_epoch)))
    assert N is not None
    if int(N) != N or N < 1:
        raise ValueError(f"N must be an integer >= 1, got {N}")
    N = int(N)
    if iters_left is not None and N > iters_left:
        raise ValueError(f"N={N} exceeds the {iters_left} iterations left in this phase: lower N or N_epochs")
    return N
