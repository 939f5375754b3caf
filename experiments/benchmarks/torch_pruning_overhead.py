"""Benchmark: what `SmoothPruner.optimizer_step()` adds to `optimizer.step()` in the README's
Torch-Pruning example (torchvision ResNet-18, CIFAR-sized input, SGD momentum + weight decay,
fp32, MagnitudePruner global at ratio 0.5 in one step: half the ranked channels decaying).

Plain steps (`opt.step()`) and smooth steps (`smooth.optimizer_step()`) alternate on the same
model so both see the same machine load; each optimizer call is timed on its own, the overhead is
the difference of the medians, reported against the whole plain training step (forward, backward,
optimizer). N is far beyond the run, so the decay stays in flight; with Self-Rectifying the
thresholds are infinite, so the decaying set stays fixed while C_rate, C_len and the rule run.

    python experiments/benchmarks/torch_pruning_overhead.py          # writes results/benchmarks/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torchvision.models import resnet18

from dpm.core import RectifyConfig
from dpm.run import CODE_SHA
from dpm.torch_pruning import SmoothPruner

ROOT = Path(__file__).resolve().parents[2]


def measure(args, sr: bool) -> dict:
    torch.manual_seed(args.seed)
    model = resnet18(num_classes=10).train()
    example = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
        pruning_ratio=0.5,
        iterative_steps=1,
        global_pruning=True,
        ignored_layers=[model.fc],
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    steps = args.warmup + args.repeats
    rectify = RectifyConfig(t_rate=float("inf"), t_len=float("inf")) if sr else None
    smooth = SmoothPruner(pruner, opt, N=100 * steps + 10, rectify=rectify)
    decaying = len(smooth.step())
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def backward() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    plain_step, plain_opt, smooth_opt = [], [], []
    for i in range(steps):
        t0 = time.perf_counter()
        backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        backward()
        t3 = time.perf_counter()
        smooth.optimizer_step()
        t4 = time.perf_counter()
        if i >= args.warmup:
            plain_step.append(t2 - t0)
            plain_opt.append(t2 - t1)
            smooth_opt.append(t4 - t3)
    assert len(smooth.controller.decaying) == decaying, "the decaying set changed during timing"
    overhead = statistics.median(smooth_opt) - statistics.median(plain_opt)
    return {
        "self_rectifying": sr,
        "channels_decaying": decaying,
        "plain_step_s_median": statistics.median(plain_step),
        "optimizer_step_s_median": statistics.median(plain_opt),
        "smooth_optimizer_step_s_median": statistics.median(smooth_opt),
        "overhead_s": overhead,
        "overhead_share_of_step": overhead / statistics.median(plain_step),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "torch_pruning_overhead_cpu.json")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    cases = [measure(args, sr) for sr in (False, True)]
    result = {
        "benchmark": "torch_pruning_overhead",
        "model": "torchvision resnet18, 32x32 input, fp32",
        "batch": args.batch,
        "device_name": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_pruning": tp.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cases": cases,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
        "git_sha": CODE_SHA,
        "command": "python experiments/benchmarks/torch_pruning_overhead.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)  # atomic: never a half-written result
    for c in cases:
        print(
            f"{'SR' if c['self_rectifying'] else 'SP'}: {c['channels_decaying']} channels decaying, "
            f"optimizer_step {c['smooth_optimizer_step_s_median'] * 1e3:.2f} ms vs opt.step "
            f"{c['optimizer_step_s_median'] * 1e3:.2f} ms: +{c['overhead_s'] * 1e3:.2f} ms = "
            f"{c['overhead_share_of_step'] * 100:.2f}% of the {c['plain_step_s_median'] * 1e3:.0f} ms training step"
        )
    return result


if __name__ == "__main__":
    main()
