"""Estimate: how many ticks (and tocks) a Gate Decorator paper row takes to reach its FLOPs target.

A tick's size depends on the tick rule and on which channels its scores pick, so no fixed formula
gives the count. This script runs the real selection (``dpm.pruners.gate_decorator.GateDecorator``,
N = 1, the row's p, floor and FLOPs target, Gate Decorator's thop counter) on the row's unpruned
model, tick after tick, with each tick's Taylor scores drawn at random (i.i.d. uniform per BN
channel, seeded), no training. Real scores are not random (they concentrate on some layers), so the
counts are estimates; each real run records its own count (``gate_decorator_ticks.json``).

    python experiments/paper/gate_decorator_ticks.py                 # both rows, both tick rules
    python experiments/paper/gate_decorator_ticks.py --rows gate_decorator_vgg16_cifar10 --seeds 0

Writes results/paper/gate_decorator_ticks.json (the numbers experiments/README.md quotes).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dpm.config import compose
from dpm.pruners.gate_decorator import GateDecorator
from dpm.pruners.gate_decorator_gates import gate_model, gated_modules
from dpm.pruners.gate_decorator_units import channel_units
from dpm.stages.base import build_configured_model

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("gate_decorator_vgg16_cifar10", "gate_decorator_resnet56_cifar10")
RULES = ("original", "units")


def ticks_to_target(row: str, rule: str, seed: int) -> dict:
    """Tick with random scores until the row's FLOPs target is met; the tick and tock counts."""
    cfg = compose([f"experiment=paper/{row}"])
    p = cfg.pruner
    torch.manual_seed(seed)
    model = build_configured_model(cfg)
    example = torch.randn(1, 3, 32, 32)
    units = channel_units(model, example, cfg.dataset.num_classes)
    skeleton = copy.deepcopy(model)
    gate_model(model)
    gd = GateDecorator(
        model,
        units,
        skeleton=skeleton,
        example=example,
        prune_ratio=p.prune_ratio,
        min_channel_ratio=p.min_channel_ratio,
        flops_target=p.flops_target,
        tick_rule=rule,
        floor_rounding="floor" if rule == "original" else "ceil",
    )
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while True:
        gd.ticks += 1
        for name, m in gated_modules(model).items():
            gd.scores[name].copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64))
        record = gd.select()
        sizes.append(len(record["selected"]))
        if record["flops_remaining"] <= p.flops_target:
            break
        if not record["selected"] or gd.ticks >= p.max_ticks:
            raise SystemExit(f"{row} ({rule}): stuck at {record['flops_remaining']:.4f} after {gd.ticks} ticks")
    # A tock after every tock_every-th tick, except when that tick met the target (the melt follows).
    tocks = (gd.ticks - 1) // p.tock_every if p.tock.epochs > 0 else 0
    return {
        "ticks": gd.ticks,
        "tocks": tocks,
        "units": len(units),
        "units_removed": sum(sizes),
        "first_tick_units": sizes[0],
        "flops_remaining": record["flops_remaining"],
        "tick_epochs": gd.ticks * p.tick.epochs,
        "tock_epochs": tocks * p.tock.epochs,
        "finetune_epochs": cfg.trainer.finetune.epochs,
        "pretrain_epochs": cfg.trainer.pretrain.epochs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "paper" / "gate_decorator_ticks.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {
        "command": "python experiments/paper/gate_decorator_ticks.py " + " ".join(sys.argv[1:]),
        "scores": "i.i.d. uniform per BN channel and tick (an estimate: real Taylor scores are not random)",
        "rows": {},
    }
    for row in args.rows:
        out["rows"][row] = {}
        for rule in args.rules:
            t0 = time.time()
            runs = [ticks_to_target(row, rule, s) for s in args.seeds]
            ticks = [r["ticks"] for r in runs]
            summary = {
                "seeds": args.seeds,
                "runs": runs,
                "ticks_mean": statistics.mean(ticks),
                "ticks_min": min(ticks),
                "ticks_max": max(ticks),
            }
            out["rows"][row][rule] = summary
            print(
                f"{row} tick_rule={rule}: ticks {ticks} (first tick {runs[0]['first_tick_units']} units), "
                f"tocks {[r['tocks'] for r in runs]}, {time.time() - t0:.0f} s",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
