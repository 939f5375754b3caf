"""experiments/benchmarks/gpu_check.sh --dry-run: the GPU check's every step on CPU with tiny sizes,
so the script is known to work before the first (15-minute) GPU loan."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_its_records(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DPM_OUTPUT_ROOT": str(tmp_path / "outputs")}
    done = subprocess.run(
        ["bash", "experiments/benchmarks/gpu_check.sh", "--dry-run", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for n in range(1, 5):
        assert f"== gpu_check (cpu): {n}/4" in done.stdout
    out = tmp_path / "out"
    throughput = json.loads((out / "throughput_cpu_smoke.json").read_text())
    assert throughput["smoke"] and [m["model"] for m in throughput["models"]] == ["resnet56", "vgg16"]
    overhead = json.loads((out / "core_overhead_cpu.json").read_text())
    assert [c["batch"] for c in overhead["cases"]] == [8, 8]
    epochs = json.loads((out / "epoch_times_cpu.json").read_text())
    assert epochs["dry_run"] and sorted(epochs["models"]) == ["resnet56", "vgg16", "vgg16_bn"]
    for record in epochs["models"].values():
        assert record["pretrain_epoch_s"] > 0 and record["finetune_epoch_s"] > 0 and record["device"] == "cpu"
    assert not list(out.glob("epoch_runs*")) and not list(out.rglob("*.pt"))  # only the records stay


def test_gpu_check_refuses_an_unknown_option():
    done = subprocess.run(
        ["bash", "experiments/benchmarks/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: unknown option --fast (valid: --dry-run, OUT_DIR)"
    ]
