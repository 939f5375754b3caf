"""DPM_REQUIRE_DATA=1 (set by .ci/run) turns every real-CIFAR-10 skip into a failure, so CI cannot
pass on a machine where the data went missing without running the tests that need it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# One test per file that needs the real CIFAR-10 (test_cpu_scale.py: its whole module).
REAL_DATA_TESTS = [
    "tests/test_data.py::test_real_cifar10_folder_loads_in_label_order",
    "tests/test_train.py::test_short_real_cifar10_run_is_above_chance",
    "tests/test_depgraph_runs.py::test_real_cifar10_base_sp_sr_end_to_end",
    "tests/test_cpu_scale.py",
]


def _pytest(env: dict[str, str]) -> tuple[dict[str, int], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *REAL_DATA_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    return counts, proc.stdout + proc.stderr


@pytest.mark.slow
def test_missing_cifar10_skips_with_the_reason_or_fails_under_dpm_require_data(tmp_path):
    env = {**os.environ, "DPM_DATA_DIR": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1"}
    env.pop("DPM_REQUIRE_DATA", None)
    counts, out = _pytest(env)
    assert counts == {"skipped": 5}, out[-3000:]
    assert f"the real CIFAR-10 copy is not at {tmp_path / 'empty' / 'cifar10'}" in out, out[-3000:]

    counts, out = _pytest({**env, "DPM_REQUIRE_DATA": "1"})
    assert "skipped" not in counts and sum(counts.values()) == 5, out[-3000:]
    assert out.count("DPM_REQUIRE_DATA=1 but the real CIFAR-10 copy is not at") >= 5, out[-3000:]
    assert "Traceback" not in out  # one line per test, no traceback (pytrace=False)


def test_no_test_skips_on_missing_cifar10_by_itself():
    """Every real-data skip goes through conftest.require_cifar10, which honours DPM_REQUIRE_DATA."""
    bare = [
        p.name
        for p in (ROOT / "tests").glob("test_*.py")
        if p.name != Path(__file__).name and "CIFAR10.is_dir()" in p.read_text()
    ]
    assert bare == []
