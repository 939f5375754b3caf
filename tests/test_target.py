"""A run is `complete` only when it met its pruning target: one that ended short has status
`target_missed`, says what it reached, is listed with the failed runs and never averaged, and a
sweep holding one exits non-zero. One unreachable target per base pruner."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import cli_env, compose, run_cli
from dpm.report import report_runs
from dpm.run import run
from helpers import one_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parent.parent

# Each ends short of its target: DepGraph's progressive selection in a single Torch-Pruning step
# selects nothing (1.00x of 2x), OTOv2's DHSPG gets one epoch (a few groups zeroed of 50%), Gate
# Decorator may tick once (far above 50% of the FLOPs).
SHORT = {
    "depgraph": ["experiment=smoke", "pruner=depgraph", "pruner.iterative_steps=1"],
    "otov2": ["experiment=otov2_smoke", "pruner.train.epochs=1"],
    "gate_decorator": ["experiment=gate_decorator_smoke", "pruner.max_ticks=1"],
}
REACHED = {
    "depgraph": "speed-up target 2.00x, reached 1.00x",
    "otov2": "group sparsity target 0.50, reached",
    "gate_decorator": "FLOPs target <= 50.0% left, reached",
}


@pytest.mark.parametrize("base", sorted(SHORT))
def test_a_run_short_of_its_target_is_target_missed_not_complete(base, tmp_path, capsys):
    cfg = compose([*SHORT[base], "dpm=base", "trainer.progress=false"])
    metrics = run(cfg, tmp_path / "run")
    assert metrics["target_met"] is False and metrics["status"] == "target_missed"
    assert REACHED[base] in metrics["error"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "target_missed" and saved["error"] == metrics["error"]
    # run again: the same run dir is finished, not re-run
    assert run(cfg, tmp_path / "run")["wall_time_s"] == metrics["wall_time_s"]
    report = report_runs([tmp_path], plots=False)
    assert list(report.problems["status"]) == ["target_missed"] and report.table.empty
    assert "0 complete, 1 short of their pruning target, 0 failed or incomplete" in report.markdown


def test_every_base_records_whether_it_met_its_target(tmp_path):
    """The three bases' smoke runs meet their targets and say so (the key the status is read from)."""
    for overrides in (
        ["experiment=smoke", "pruner=depgraph"],
        ["experiment=otov2_smoke"],
        ["experiment=gate_decorator_smoke"],
    ):
        cfg = compose([*overrides, "dpm=base", "trainer.progress=false"])
        metrics = run(cfg, tmp_path / cfg.name)
        assert metrics["status"] == "complete" and metrics["target_met"] is True, overrides


def cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m dpm` on one thread with this test's outputs and cache, W&B off."""
    return run_cli([*args, "trainer.progress=false"], env=cli_env(tmp_path), timeout=600)


@pytest.mark.slow
def test_a_sweep_with_a_missed_target_exits_non_zero_and_says_so(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        ["-m", *SHORT["depgraph"], "dpm=base", "pruner.iterative_steps=1,400", f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert last and "1 of 2 runs" in last[-1] and "report.md" in last[-1], proc.stderr[-3000:]
    text = (sweep / "report" / "report.md").read_text()
    assert "1 complete, 1 short of their pruning target, 0 failed or incomplete" in text


@pytest.mark.slow
def test_a_single_run_that_missed_its_target_prints_what_it_reached_and_exits_1(tmp_path):
    proc = cli([*SHORT["depgraph"], "dpm=base", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "target_missed" in proc.stdout
    assert "missed its pruning target: speed-up target 2.00x, reached 1.00x" in proc.stdout + proc.stderr
