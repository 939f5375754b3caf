"""Shared fixtures: every test runs with outputs, caches and W&B files in its own tmp dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dpm.faults
from dpm.config import compose  # noqa: F401  (the config `python -m dpm <overrides>` would run)

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
# The real CIFAR-10 copy beside the project checkout (see README: DPM_DATA_DIR).
SHARED_DATA = Path(os.environ.get("DPM_DATA_DIR", ROOT.parent / "shared" / "data"))
CIFAR10 = SHARED_DATA / "cifar10"
# The fault-injection hook (dpm.faults): on PYTHONPATH for every process a test starts (its
# sitecustomize installs the hook when DPM_FAULT_* is set), on sys.path for in-process tests.
FAULT_HOOK = ROOT / "tests" / "fault_hook"
sys.path.insert(0, str(FAULT_HOOK))


def require_cifar10() -> Path:
    """The real CIFAR-10 folder, or skip the calling test with the reason. Under DPM_REQUIRE_DATA=1
    (.ci/run) a missing copy fails the test instead, in one line: CI must not pass by skipping."""
    if not CIFAR10.is_dir():
        reason = f"the real CIFAR-10 copy is not at {CIFAR10} (DPM_DATA_DIR names the folder that holds cifar10/)"
        if os.environ.get("DPM_REQUIRE_DATA") == "1":
            pytest.fail(f"DPM_REQUIRE_DATA=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return CIFAR10


@pytest.fixture
def cifar10() -> Path:
    """:func:`require_cifar10` as a fixture (``@pytest.mark.usefixtures("cifar10")``)."""
    return require_cifar10()


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DPM_OUTPUT_ROOT", str(tmp_path / "outputs"))
    monkeypatch.setenv("DPM_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("DPM_FAULT_AT", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAULT_HOOK), os.environ.get("PYTHONPATH")])))
    yield
    dpm.faults.install(None)  # a hook a test installed in this process ends with the test


def cli_env(tmp_path: Path) -> dict:
    """The environment of a command-line run on one thread with its outputs and cache in `tmp_path`, W&B off."""
    return {
        "OMP_NUM_THREADS": "1",
        "DPM_OUTPUT_ROOT": str(tmp_path / "out"),
        "DPM_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_MODE": "disabled",
    }


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m dpm <args>` in a subprocess, from the project root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "dpm", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def decode_cache(tmp_path_factory):
    """One decoded copy of the real CIFAR-10 for the whole session (decoding takes seconds)."""
    return tmp_path_factory.mktemp("decoded")


# Fault-injection summary (tests/test_faults.py): the figures the README's reliability section quotes.
FAULT_CASES: list[tuple[str, bool, bool]] = []  # (test id, survived, data lost)


def pytest_configure(config):
    config.addinivalue_line("markers", "fault: a fault-injection case counted in the session summary")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and item.get_closest_marker("fault") is not None:
        lost = report.failed and call.excinfo is not None and call.excinfo.typename == "DataLost"
        FAULT_CASES.append((item.nodeid, report.passed, lost))


def pytest_terminal_summary(terminalreporter):
    if FAULT_CASES:
        survived = sum(ok for _, ok, _ in FAULT_CASES)
        lost = sum(lost for _, _, lost in FAULT_CASES)
        terminalreporter.write_line(
            f"fault injection: {len(FAULT_CASES)} cases tried, {survived} survived, data lost in {lost}"
        )
