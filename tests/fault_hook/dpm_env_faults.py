"""The fault-injection tests' hook (dpm.faults.FaultHook), driven by the environment so that it
reaches every process a test starts: `python -m dpm`, torchrun's ranks, SLURM jobs.

`DPM_FAULT_AT=<point>` (e.g. `pretrain:epoch2`, right after that epoch's checkpoint) makes the
process SIGKILL itself there, so a test can prove that a killed run resumes exactly;
`<phase>:kill_step<k>` kills at step k of a phase (mid-epoch, e.g. mid-decay) and
`<phase>:nan_step<k>` makes step k's loss NaN and `<phase>:abort_step<k>` aborts the process there
(SIGABRT, as glibc does on a corrupted heap). `DPM_FAULT_SLEEP_S=<s>` sleeps that long after every
epoch's checkpoint, so a SLURM test can pre-empt a job between two known epochs.
"""

from __future__ import annotations

import os
import signal
import time

import dpm.faults


class EnvFaults:
    """Kill at the point `at` names, poison or kill at its step, sleep after every epoch."""

    def __init__(self, at: str = "", sleep_s: float = 0.0) -> None:
        self.at = at
        self.sleep_s = sleep_s

    def point(self, name: str) -> None:
        if name == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep_s and ":epoch" in name:
            time.sleep(self.sleep_s)

    def step(self, phase: str, step: int, loss):
        if self.at == f"{phase}:kill_step{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.at == f"{phase}:abort_step{step}":
            os.abort()
        if self.at == f"{phase}:nan_step{step}":
            return loss * float("nan")
        return loss


def install_from_env() -> None:
    """Install EnvFaults when a DPM_FAULT_* variable is set; leave dpm.faults alone otherwise."""
    at = os.environ.get("DPM_FAULT_AT", "")
    sleep_s = float(os.environ.get("DPM_FAULT_SLEEP_S") or 0)
    if at or sleep_s:
        dpm.faults.install(EnvFaults(at, sleep_s))
