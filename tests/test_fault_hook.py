"""The fault hook (dpm.faults): the code marks fault points, only tests install what happens there."""

from __future__ import annotations

import os
import subprocess
import sys

import dpm.faults
from conftest import ROOT, compose
from dpm.run import run


def test_fault_points_do_nothing_without_the_test_hook(tmp_path):
    """A real run never reads DPM_FAULT_AT: with it set and no hook installed (a user's shell that
    happens to have it), nothing is poisoned. Only a test installs the hook (dpm.faults.install)."""
    os.environ["DPM_FAULT_AT"] = "pretrain:nan_step10"  # isolated_env removes it afterwards
    previous = dpm.faults.install(None)
    try:
        metrics = run(
            compose(
                [
                    "experiment=smoke",
                    "trainer.on_nan=skip_step",
                    "trainer.pretrain.epochs=3",
                    "dataset.synthetic_train=512",
                ]
            ),
            tmp_path / "run",
        )
    finally:
        dpm.faults.install(previous)
    assert metrics["status"] == "complete" and metrics["nonfinite_steps_skipped"] == 0


def test_no_dpm_module_reads_the_fault_variables():
    """The environment variables that drive faults are the test hook's (tests/fault_hook), not dpm's."""
    readers = [p for p in (ROOT / "dpm").rglob("*.py") if any(q + "DPM_FAULT" in p.read_text() for q in "\"'")]
    assert readers == []


def test_the_hook_reaches_a_subprocess_through_the_tests_environment():
    """conftest puts tests/fault_hook on PYTHONPATH, so a `python -m dpm` subprocess installs the
    hook at start-up (its sitecustomize) exactly when a DPM_FAULT_* variable is set."""
    probe = "import dpm.faults as f; print(type(f.installed()).__name__)"
    env = {**os.environ, "DPM_FAULT_AT": "pretrain:epoch1"}
    on = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
    env.pop("DPM_FAULT_AT")
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, cwd=ROOT)
    assert (on.stdout.strip(), off.stdout.strip()) == ("EnvFaults", "NoneType"), on.stderr + off.stderr
