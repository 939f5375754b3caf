"""Benchmark: where a CPU training step's time goes, and how much the fast path can gain.

ResNet-56, batch 128, SGD momentum: the bare training step (zero_grad, forward, loss, backward,
optimizer step; no data loading) in the four combinations of fp32 / bf16 autocast and NCHW /
channels_last, alternating so all see the same machine load; then the torch profiler's top ops of
the bf16 channels_last step (what ``trainer.fast`` runs). The ratio fp32 NCHW / fast is the most the
suite can gain over a plain fp32 loop from its step alone (throughput.py measures the whole path).

    python experiments/benchmarks/step_breakdown.py --device cpu --repeats 6

Writes results/benchmarks/step_breakdown_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from dpm.models import build_model
from dpm.run import CODE_SHA
from dpm.train import resolve_speed

ROOT = Path(__file__).resolve().parents[2]

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results" / "benchmarks")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    x0 = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    nets = {}
    for dtype, cl in CONFIGS:
        torch.manual_seed(0)
        net = build_model(args.model, num_classes=10).to(device).train()
        net = net.to(memory_format=torch.channels_last) if cl else net
        nets[(dtype, cl)] = (net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4))

    def step(dtype: str, cl: bool) -> None:
        net, opt = nets[(dtype, cl)]
        x = x0.contiguous(memory_format=torch.channels_last) if cl else x0
        opt.zero_grad(set_to_none=True)
        bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with bf16:
            out = net(x)
        nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict = {c: [] for c in CONFIGS}
    load_before = os.getloadavg()[0]
    for r in range(args.repeats + 1):
        for c in CONFIGS:
            t0 = time.perf_counter()
            step(*c)
            if r:  # the first round warms up
                times[c].append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step("bf16", True)
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    fast = statistics.median(times[("bf16", True)])
    sha = CODE_SHA or "unknown"
    result = {
        "benchmark": "step_breakdown",
        "model": args.model,
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu_capability": resolve_speed({"fast": None}, device).basis,
        "torch": torch.__version__,
        "step_s_median": {
            f"{d} {'channels_last' if cl else 'NCHW'}": statistics.median(times[(d, cl)]) for d, cl in CONFIGS
        },
        "fp32_nchw_over_fast": statistics.median(times[("fp32", False)]) / fast,
        "fast_profile_top": [{"op": e.key, "share": e.self_cpu_time_total / total} for e in top],
        "conv_share": sum(e.self_cpu_time_total for e in averages if "conv" in e.key) / total,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
        "git_sha": sha,
        "command": "python experiments/benchmarks/step_breakdown.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    lines = [
        f"# Where the {args.model} training step's time goes ({device}, batch {args.batch})",
        "",
        f"{result['cpu_capability']}; {result['threads']} torch threads; torch {result['torch']}; load average "
        f"{load_before:.2f} -> {result['load_avg_1m_after']:.2f}; git {sha[:7]}.",
        "",
        f"Command: `{result['command'].strip()}`",
        "",
        "| step | median ms |",
        "|---|---|",
        *[f"| {k} | {v * 1e3:.0f} |" for k, v in result["step_s_median"].items()],
        "",
        f"fp32 NCHW / bf16 channels_last: {result['fp32_nchw_over_fast']:.2f}x. Convolution ops (forward and "
        f"backward) take {result['conv_share'] * 100:.0f}% of the bf16 channels_last step; its top ops:",
        "",
        "| op | share of the step |",
        "|---|---|",
        *[f"| {t['op']} | {t['share'] * 100:.1f}% |" for t in result["fast_profile_top"]],
        "",
    ]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", "\n".join(lines))):
        out = args.out_dir / f"step_breakdown_{device.type}{suffix}"
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)  # atomic: never a half-written result
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
