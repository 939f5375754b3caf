"""Fault points: the named places where a test may kill the process or poison a step.

The code only *marks* the points; nothing happens at them unless a test installed a hook with
:func:`install`. No real run reads anything here: the environment variables that drive the
fault-injection tests (`DPM_FAULT_AT`, `DPM_FAULT_SLEEP_S`) are read by the test hook alone
(tests/fault_hook/, which the test suite puts on PYTHONPATH so subprocesses install it too).

Points: `<phase>:epoch<k>` (right after that epoch's checkpoint), `rounds:before_removal`,
`run:before_metrics`, `report:after_first_file`; and every training step of every phase, where the
hook sees the loss before `backward` (a kill mid-epoch, e.g. mid-decay, or a loss made NaN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: this module stays importable without torch
    import torch


class FaultHook(Protocol):
    """What a test installs. Both methods return normally to let the run go on."""

    def point(self, name: str) -> None:
        """Called at every named point."""

    def step(self, phase: str, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Called at every training step (`step` counts from the phase's start) with the loss
        before `backward`; returns the loss the step goes on with."""


_hook: FaultHook | None = None


def install(hook: FaultHook | None) -> FaultHook | None:
    """Install `hook` (None removes it); returns the one it replaces."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def installed() -> FaultHook | None:
    """The installed hook, or None (every real run)."""
    return _hook


def fault_point(name: str) -> None:
    """Mark the point `name`: the installed hook, if any, sees it."""
    if _hook is not None:
        _hook.point(name)
