"""Accuracy of the CPU fast path (bf16 autocast + channels_last) against fp32 NCHW, per seed.

The fp32 NCHW side is the archived CPU-scale baselines (results/cpu_scale/five_seed/runs/pretrain/<seed>/,
ResNet-20 on the real CIFAR-10, made with `trainer.fast=null`, which then meant fp32 NCHW on CPU).
This script makes the fast-path side with the same recipe (`experiment=cpu_scale/pretrain`) and
`trainer.fast=true`, one seed after another, then writes the comparison:

    export DPM_DATA_DIR=../shared/data
    OMP_NUM_THREADS=1 python experiments/benchmarks/accuracy_fast_path.py run --seeds 0,1,2
    python experiments/benchmarks/accuracy_fast_path.py report

`run` is resumable: a complete run is skipped (`python -m dpm` returns its record), a killed one
continues from its checkpoint. Runs and their cache live outside the repository
(`$DPM_OUTPUT_ROOT/accuracy_fast_path`, default /tmp/dpm_accuracy_fast_path). `report` writes
results/benchmarks/accuracy_fast_path.{json,md}: test and validation top-1 per seed, mean and
sample std of each side, and whether the difference of the means lies within the seed spread
(|mean_fast - mean_fp32| <= the larger of the two std).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHIVE = ROOT / "results" / "cpu_scale" / "five_seed" / "runs" / "pretrain"
OUT = ROOT / "results" / "benchmarks"
RECIPE = ["experiment=cpu_scale/pretrain", "trainer.fast=true"]


def work_root() -> Path:
    base = os.environ.get("DPM_OUTPUT_ROOT")
    return Path(base) / "accuracy_fast_path" if base else Path("/tmp/dpm_accuracy_fast_path")


def run_dir(seed: int) -> Path:
    return work_root() / "runs" / f"seed{seed}"


def command(seed: int) -> list[str]:
    root = work_root()
    return [
        sys.executable,
        "-m",
        "dpm",
        *RECIPE,
        f"seed={seed}",
        f"cache_dir={root / 'cache'}",
        f"output_root={root / 'outputs'}",
        f"hydra.run.dir={run_dir(seed)}",
        "run_id=fast",
    ]


def run(seeds: list[int]) -> None:
    for seed in seeds:
        print(" ".join(command(seed)), flush=True)
        done = subprocess.run(command(seed), cwd=ROOT)
        if done.returncode:
            sys.exit(f"seed {seed} failed (exit {done.returncode}); see {run_dir(seed)}")


def _side(records: dict[int, dict], key: str) -> dict:
    values = [records[s][key] for s in sorted(records)]
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def report() -> dict:
    fast, fp32 = {}, {}
    for seed_dir in sorted(work_root().glob("runs/seed*")):
        path = seed_dir / "metrics.json"
        if path.exists() and (m := json.loads(path.read_text())).get("status") == "complete":
            fast[int(m["seed"])] = m
    for path in sorted(ARCHIVE.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        fp32[int(m["seed"])] = m
    if not fast:
        sys.exit(f"no complete fast-path run under {work_root()}: run `... accuracy_fast_path.py run` first")
    seeds = sorted(fast)
    rows = [
        {
            "seed": s,
            "fp32_test_top1": fp32[s]["top1_final"],
            "fast_test_top1": fast[s]["top1_final"],
            "fp32_val_top1": fp32[s]["val_top1_final"],
            "fast_val_top1": fast[s]["val_top1_final"],
            "fp32_wall_time_s": fp32[s]["wall_time_s"],
            "fast_wall_time_s": fast[s]["wall_time_s"],
        }
        for s in seeds
    ]
    summary = {}
    for split, key in (("test", "top1_final"), ("val", "val_top1_final")):
        a, b = _side(fp32, key), _side({s: fast[s] for s in seeds}, key)
        diff = b["mean"] - a["mean"]
        summary[split] = {
            "fp32": a,
            "fast": b,
            "diff_fast_minus_fp32": diff,
            "within_seed_spread": abs(diff) <= max(a["std"], b["std"]),
        }
    first = fast[seeds[0]]
    threads = sorted({m.get("threads") or m.get("torch_threads") for m in fast.values()} - {None})
    result = {
        "benchmark": "accuracy_fast_path",
        "recipe": "experiment=cpu_scale/pretrain (ResNet-20, CIFAR-10 20k subset, 5k val, 15 epochs, lr 0.1 cosine, "
        "batch 128)",
        "fp32": {
            "source": str(ARCHIVE.relative_to(ROOT)),
            "seeds": sorted(fp32),
            "bf16": False,
            "channels_last": False,
            "threads": 2,
        },
        "fast": {
            "seeds": seeds,
            "bf16": first.get("bf16"),
            "channels_last": first.get("channels_last"),
            "fast_basis": first.get("fast_basis"),
            "threads_recorded": threads or None,
            "threads": int(os.environ.get("DPM_ACCURACY_THREADS", "1")),
            "git_sha": first.get("git_sha"),
            "torch": first.get("torch"),
        },
        "rows": rows,
        "summary": summary,
        "command": "OMP_NUM_THREADS=1 python experiments/benchmarks/accuracy_fast_path.py run --seeds "
        + ",".join(map(str, seeds))
        + " && python experiments/benchmarks/accuracy_fast_path.py report",
        "run_command": " ".join(["python -m dpm", *RECIPE, "seed=<seed>"]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "accuracy_fast_path.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "accuracy_fast_path.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [
        "# CPU fast path vs fp32 NCHW: accuracy (ResNet-20, real CIFAR-10, CPU-scale baseline recipe)",
        "",
        f"Recipe: {r['recipe']}. fp32 NCHW: the archived baselines ({r['fp32']['source']}, 2 threads). "
        f"Fast path: `{r['run_command']}` (bf16={r['fast']['bf16']}, channels_last={r['fast']['channels_last']}, "
        f"{r['fast']['threads']} thread(s), git {r['fast']['git_sha']}).",
        "",
        f"Command: `{r['command']}`",
        "",
        "| seed | fp32 test top-1 | fast test top-1 | fp32 val top-1 | fast val top-1 | fp32 wall s | fast wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['seed']} | {row['fp32_test_top1']:.2f} | {row['fast_test_top1']:.2f} | "
            f"{row['fp32_val_top1']:.2f} | {row['fast_val_top1']:.2f} | {row['fp32_wall_time_s']:.0f} | "
            f"{row['fast_wall_time_s']:.0f} |"
        )
    lines.append("")
    for split, s in r["summary"].items():
        lines.append(
            f"- {split}: fp32 {s['fp32']['mean']:.2f} ± {s['fp32']['std']:.2f} (n={s['fp32']['n']}), "
            f"fast {s['fast']['mean']:.2f} ± {s['fast']['std']:.2f} (n={s['fast']['n']}); difference "
            f"{s['diff_fast_minus_fp32']:+.2f} points, within the seed spread: "
            f"{'yes' if s['within_seed_spread'] else 'no'}"
        )
    lines += [
        "",
        "Mean ± sample std over seeds. Within the seed spread: |difference of means| <= the larger std. "
        "Wall times are not comparable across the two sides (fp32: 2 threads, another machine load; "
        "fast: see threads above).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["run", "report"])
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    if args.stage == "run":
        run([int(s) for s in args.seeds.split(",")])
    else:
        report()


if __name__ == "__main__":
    main()
