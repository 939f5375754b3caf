"""The throughput benchmark's smoke mode runs end to end and writes its JSON and Markdown
(timings are recorded, never asserted)."""
from __future__ import annotations

import importlib.util
import json

from conftest import ROOT


def test_throughput_benchmark_smoke_writes_json_and_markdown(tmp_path):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "experiments" / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--smoke", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)])
    written = json.loads((tmp_path / "throughput_cpu_smoke.json").read_text())
    assert written["smoke"] and written["device"] == "cpu"
    assert [m["model"] for m in written["models"]] == ["resnet56", "vgg16"]
    for m in written["models"]:
        assert m["reference_images_per_s"] > 0 and m["suite_images_per_s"] > 0
        assert m["ratio"] == m["suite_images_per_s"] / m["reference_images_per_s"]
        assert m["reference"]["dataloader_workers"] >= 1 and m["suite"]["data_on_device"]
        assert not m["suite"]["bf16"]  # the CPU default path is the plain fp32 loop
    assert written["dpm_overhead"]["ratio"] > 0 and written["dpm_overhead"]["targets_decaying"] > 0
    md = (tmp_path / "throughput_cpu_smoke.md").read_text()
    assert "| resnet56 |" in md and "| vgg16 |" in md and "DPM controller overhead" in md
    assert result["models"][0]["model"] == "resnet56"
