"""The benchmarks run end to end at tiny sizes and write their JSON (and Markdown): timings are
recorded, never asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

# Run-level: minutes on 2 cores (`pytest -m "not slow"` leaves it out).
pytestmark = pytest.mark.slow


def benchmark(name: str):
    """experiments/benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_smoke_writes_json_and_markdown(tmp_path):
    bench = benchmark("throughput")
    import torch

    from dpm.train import resolve_speed

    cpu = resolve_speed({}, torch.device("cpu"))
    result = bench.main(["--smoke", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)])
    written = json.loads((tmp_path / "throughput_cpu_smoke.json").read_text())
    assert written["smoke"] and written["device"] == "cpu"
    assert [m["model"] for m in written["models"]] == ["resnet56", "vgg16"]
    for m in written["models"]:
        assert m["reference_images_per_s"] > 0 and m["suite_images_per_s"] > 0
        assert m["ratio"] == m["suite_images_per_s"] / m["reference_images_per_s"]
        assert m["reference"]["dataloader_workers"] >= 1 and m["suite"]["data_on_device"]
        # The suite runs what trainer.fast=null resolves to on this CPU (the fast path where bf16 is native).
        assert m["suite"]["bf16"] == m["suite"]["channels_last"] == cpu.bf16 == cpu.channels_last
    assert written["dpm_overhead"]["ratio"] > 0 and written["dpm_overhead"]["targets_decaying"] > 0
    assert written["dpm_overhead"]["sp_ratio"] > 0 and written["dpm_overhead"]["step"]["bf16"] == cpu.bf16
    # End to end: one epoch per path (batch assembly, augmentation, evaluation included).
    (epoch,) = written["epochs"]
    assert epoch["model"] == "resnet56" and epoch["reference"]["epoch_s"] > 0 and epoch["suite"]["epoch_s"] > 0
    assert epoch["ratio"] == epoch["reference"]["epoch_s"] / epoch["suite"]["epoch_s"]
    md = (tmp_path / "throughput_cpu_smoke.md").read_text()
    assert "| resnet56 |" in md and "| vgg16 |" in md and "DPM controller overhead" in md and "End to end" in md
    assert result["models"][0]["model"] == "resnet56"


def test_torch_pruning_overhead_benchmark_runs_and_writes_json(tmp_path):
    bench = benchmark("torch_pruning_overhead")
    out = tmp_path / "tp.json"
    bench.main(["--batch", "4", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    written = json.loads(out.read_text())
    assert [c["self_rectifying"] for c in written["cases"]] == [False, True]
    for c in written["cases"]:
        assert c["channels_decaying"] > 0 and c["plain_step_s_median"] > 0
        assert c["overhead_s"] == c["smooth_optimizer_step_s_median"] - c["optimizer_step_s_median"]


def test_step_breakdown_benchmark_writes_json_and_markdown(tmp_path):
    args = ["--model", "resnet20", "--batch", "4", "--repeats", "1", "--out-dir", str(tmp_path)]
    benchmark("step_breakdown").main(args)
    written = json.loads((tmp_path / "step_breakdown_cpu.json").read_text())
    assert set(written["step_s_median"]) == {"fp32 NCHW", "fp32 channels_last", "bf16 NCHW", "bf16 channels_last"}
    assert all(v > 0 for v in written["step_s_median"].values()) and written["fp32_nchw_over_fast"] > 0
    assert 0 < written["conv_share"] <= 1 and len(written["fast_profile_top"]) == 8
    assert "| bf16 channels_last |" in (tmp_path / "step_breakdown_cpu.md").read_text()
