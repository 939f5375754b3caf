"""Fault injection for tests: kill the process for real at a named point.

`DPM_FAULT_AT=<point>` (e.g. `pretrain:epoch2`, written right after that epoch's checkpoint)
makes the process SIGKILL itself there, so tests can prove that a killed run resumes exactly.
"""
from __future__ import annotations

import os
import signal


def fault_point(point: str) -> None:
    """SIGKILL this process if DPM_FAULT_AT names `point`."""
    if os.environ.get("DPM_FAULT_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
