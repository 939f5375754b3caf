"""The throughput benchmark's smoke mode runs end to end and writes its JSON and Markdown
(timings are recorded, never asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

# Run-level: minutes on 2 cores (`pytest -m "not slow"` leaves it out).
pytestmark = pytest.mark.slow


def test_throughput_benchmark_smoke_writes_json_and_markdown(tmp_path):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "experiments" / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
    path = ROOT / "experiments" / "benchmarks" / "torch_pruning_overhead.py"
    spec = importlib.util.spec_from_file_location("torch_pruning_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "tp.json"
    bench.main(["--batch", "4", "--repeats", "2", "--warmup", "0", "--out", str(out)])
    written = json.loads(out.read_text())
    assert [c["self_rectifying"] for c in written["cases"]] == [False, True]
    for c in written["cases"]:
        assert c["channels_decaying"] > 0 and c["plain_step_s_median"] > 0
        assert c["overhead_s"] == c["smooth_optimizer_step_s_median"] - c["optimizer_step_s_median"]
