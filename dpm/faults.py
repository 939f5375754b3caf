"""Fault injection for tests: kill the process for real at a named point, or poison a step.

`DPM_FAULT_AT=<point>` (e.g. `pretrain:epoch2`, right after that epoch's checkpoint is written)
makes the process SIGKILL itself there, so tests can prove that a killed run resumes exactly.
`DPM_FAULT_AT=<phase>:kill_step<k>` kills at step k of a phase (mid-epoch, e.g. mid-decay) and
`DPM_FAULT_AT=<phase>:nan_step<k>` makes step k's loss NaN (see `fault_step`). Other points:
`rounds:before_removal`, `run:before_metrics`, `report:after_first_file`.
"""

from __future__ import annotations

import os
import signal
import time


def fault_point(point: str) -> None:
    """SIGKILL this process if DPM_FAULT_AT names `point`."""
    if os.environ.get("DPM_FAULT_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
    fault_sleep(point)


def fault_step(prefix: str) -> int | None:
    """The step k if DPM_FAULT_AT is `<prefix><k>` (read once per phase, not per step)."""
    value = os.environ.get("DPM_FAULT_AT", "")
    if value.startswith(prefix) and value[len(prefix) :].isdigit():
        return int(value[len(prefix) :])
    return None


def fault_sleep(point: str) -> None:
    """Sleep `DPM_FAULT_SLEEP_S` seconds at every per-epoch point (`<phase>:epoch<k>`, right after
    the epoch's checkpoint), so that a SLURM test can pre-empt a job between two known epochs."""
    seconds = os.environ.get("DPM_FAULT_SLEEP_S")
    if seconds and ":epoch" in point:
        time.sleep(float(seconds))
