"""Benchmark: training throughput of the suite's default path against a plain torchvision loop.

In one process and one run, for each model (ResNet-56 and VGG-16, batch 128, CIFAR-10):
  (a) reference: the loop a researcher writes first: a torchvision CIFAR10-style Dataset over the
      decoded images (PIL image per item) with RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor +
      Normalize, a DataLoader with worker processes, fp32, `.item()` on the loss every step;
  (b) suite: the default path of `python -m dpm` on this device: the split resident on the device
      as uint8 (SplitLoader, augmentation and normalisation on the device) driven by
      `dpm.train.train_phase`, with what `trainer.fast=null` resolves to (bf16 autocast and
      channels_last on CUDA and on a CPU with native bf16, dpm.train.resolve_speed).
Blocks of the two alternate (`--rounds`) so both see the same machine load; warm-up steps are not
timed. Then, for `--epoch-models`, one end-to-end epoch of each path on the first `--epoch-images`
training images with an evaluation on `--eval-images` test images (batch assembly, augmentation
and evaluation included), and the DPM controller's per-step overhead ratio against the suite's
step (experiments/benchmarks/core_overhead.py).

    python experiments/benchmarks/throughput.py                      # CUDA when present, else CPU
    python experiments/benchmarks/throughput.py --device cpu --steps 6 --rounds 2 --threads 1
    python experiments/benchmarks/throughput.py --smoke --out-dir /tmp/bench   # seconds, synthetic data (CI)

Writes results/benchmarks/throughput_<device>.json and .md. Goals (recorded, never asserted): the
suite >= 3x the reference's images/s for ResNet-56 on CUDA, >= 2.5x on CPU (issue 21, 2 cores);
DPM overhead with Self-Rectifying <= 1% of the suite's step at batch 128.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dpm.config import PhaseConfig
from dpm.data.loaders import SplitLoader
from dpm.data.sources import ImageSplit
from dpm.models import build_model
from dpm.run import CODE_SHA
from dpm.train import resolve_speed, train_phase

ROOT = Path(__file__).resolve().parents[2]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
GOALS = {
    "cuda_resnet56_ratio_min": 3.0,
    "cpu_resnet56_ratio_min": 2.5,
    "dpm_overhead_sr_max": 0.01,
    "dpm_overhead_sp_max": 0.005,
}


class CIFAR10Style(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: list[int], transform):
        self.data, self.targets, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def load_split(args) -> ImageSplit:
    if args.smoke:
        g = torch.Generator().manual_seed(0)
        return ImageSplit(
            torch.randint(0, 256, (args.smoke_images, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.arange(args.smoke_images) % 10,
        )
    from dpm.data.sources import load_cifar

    train, _ = load_cifar("cifar10", str(args.data), False, str(args.cache_dir))
    return train


def load_test(args) -> ImageSplit:
    if args.smoke:
        g = torch.Generator().manual_seed(1)
        return ImageSplit(torch.randint(0, 256, (32, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(32) % 10)
    from dpm.data.sources import load_cifar

    return load_cifar("cifar10", str(args.data), False, str(args.cache_dir))[1]


def suite_train_loader(split: ImageSplit, batch: int, device: torch.device, speed) -> SplitLoader:
    """The suite's training batches: the split resident on the device, augmented there."""
    return SplitLoader(
        split,
        batch,
        CIFAR_MEAN,
        CIFAR_STD,
        device,
        train=True,
        augment=True,
        seed=0,
        phase="bench",
        channels_last=speed.channels_last,
    )


def seeded_model(name: str, device: torch.device, channels_last: bool = False) -> torch.nn.Module:
    """The benchmarked net with seed 0's weights (the same start for every path), on `device`."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_block(model, opt, batches, device, steps: int) -> tuple[int, float]:
    """`steps` plain steps pulling from a live DataLoader iterator: (images, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    images = 0
    for _ in range(steps):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # what a plain loop does to print or accumulate the loss
        images += len(y)
    sync(device)
    return images, time.perf_counter() - t0


class _FixedEpoch:
    """A loader whose epoch is set by the benchmark, not by train_phase (which starts at epoch 0)."""

    def __init__(self, inner: SplitLoader, epoch: int):
        self.inner = inner
        inner.set_epoch(epoch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        return iter(self.inner)


def suite_block(model, loader: SplitLoader, device, speed, steps: int, epoch: int) -> tuple[int, float]:
    """One `train_phase` epoch capped at `steps` steps (no eval, no checkpoint): (images, seconds)."""
    loader.max_steps = steps
    phase_cfg = PhaseConfig(epochs=1, lr=0.01, schedule="constant", batch_size=loader.batch_size)
    sync(device)
    t0 = time.perf_counter()
    train_phase(
        model,
        "bench",
        phase_cfg,
        _FixedEpoch(loader, epoch),
        {},
        device,
        progress=False,
        bf16=speed.bf16,
        compile=speed.compile,
    )
    sync(device)
    return steps * loader.batch_size, time.perf_counter() - t0


def bench_model(name: str, split: ImageSplit, args, device: torch.device) -> dict:
    import torchvision.transforms as T

    speed = resolve_speed({"fast": None, "compile": args.compile}, device)
    ref_model = seeded_model(name, device).train()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    transform = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    )
    dataset = CIFAR10Style(split.images.permute(0, 2, 3, 1).contiguous().numpy(), split.labels.tolist(), transform)
    workers = args.workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    epoch_iter = iter(loader)

    def batches():
        nonlocal epoch_iter
        while True:
            for b in epoch_iter:
                yield b
            epoch_iter = iter(loader)

    ref_batches = batches()

    suite_model = seeded_model(name, device, speed.channels_last)
    suite_loader = suite_train_loader(split, args.batch, device, speed)

    reference_block(ref_model, ref_opt, ref_batches, device, args.warmup)  # workers started, allocator warm
    suite_block(suite_model, suite_loader, device, speed, args.warmup, epoch=0)
    ref_images = ref_time = suite_images = suite_time = 0.0
    blocks = []
    for r in range(args.rounds):
        ri, rt = reference_block(ref_model, ref_opt, ref_batches, device, args.steps)
        si, st = suite_block(suite_model, suite_loader, device, speed, args.steps, epoch=r + 1)
        blocks.append({"reference_images_per_s": ri / rt, "suite_images_per_s": si / st})
        ref_images, ref_time, suite_images, suite_time = (
            ref_images + ri,
            ref_time + rt,
            suite_images + si,
            suite_time + st,
        )
        print(f"  {name} round {r + 1}: reference {ri / rt:8.1f} img/s, suite {si / st:8.1f} img/s", flush=True)
    epoch_iter = ref_batches = loader = None  # drop the iterators: the workers stop
    ref_ips, suite_ips = ref_images / ref_time, suite_images / suite_time
    return {
        "model": name,
        "batch": args.batch,
        "steps_timed_each": int(args.steps * args.rounds),
        "reference_images_per_s": ref_ips,
        "suite_images_per_s": suite_ips,
        "ratio": suite_ips / ref_ips,
        "reference": {"dataloader_workers": workers, "dtype": "float32", "item_per_step": True},
        "suite": {
            "fast": speed.fast,
            "bf16": speed.bf16,
            "channels_last": speed.channels_last,
            "compile": speed.compile,
            "data_on_device": True,
        },
        "blocks": blocks,
    }


def bench_epoch(name: str, split: ImageSplit, test: ImageSplit, args, device: torch.device) -> dict:
    """One end-to-end epoch per path on the first `--epoch-images` training images, then top-1 on
    the first `--eval-images` test images: (seconds, images/s of the training part) per path."""
    import torchvision.transforms as T

    n, m = min(args.epoch_images, len(split)), min(args.eval_images, len(test))
    train_part = ImageSplit(split.images[:n], split.labels[:n])
    test_part = ImageSplit(test.images[:m], test.labels[:m])
    speed = resolve_speed({"fast": None, "compile": args.compile}, device)
    out = {"model": name, "train_images": n, "eval_images": m, "batch": args.batch}

    # (a) reference: DataLoader epoch with torchvision transforms, then a plain evaluation loop.
    model = seeded_model(name, device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    aug = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    )
    plain = T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    hwc = lambda s: s.images.permute(0, 2, 3, 1).contiguous().numpy()  # noqa: E731
    train_dl = torch.utils.data.DataLoader(
        CIFAR10Style(hwc(train_part), train_part.labels.tolist(), aug),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    test_dl = torch.utils.data.DataLoader(
        CIFAR10Style(hwc(test_part), test_part.labels.tolist(), plain), batch_size=256, num_workers=args.workers
    )
    sync(device)
    t0 = time.perf_counter()
    for x, y in train_dl:  # worker start-up counts: a plain loop pays it every epoch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    sync(device)
    t1 = time.perf_counter()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in test_dl:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    sync(device)
    t2 = time.perf_counter()
    out["reference"] = {"epoch_s": t2 - t0, "train_s": t1 - t0, "eval_s": t2 - t1, "train_images_per_s": n / (t1 - t0)}

    # (b) suite: one train_phase epoch with its evaluation (what `python -m dpm` runs an epoch).
    model = seeded_model(name, device, speed.channels_last)
    loader = suite_train_loader(train_part, args.batch, device, speed)
    evals = {
        "test": SplitLoader(
            test_part, speed.eval_batch_size, CIFAR_MEAN, CIFAR_STD, device, channels_last=speed.channels_last
        )
    }
    phase_cfg = PhaseConfig(epochs=1, lr=0.01, schedule="constant", batch_size=args.batch)
    sync(device)
    t0 = time.perf_counter()
    summary = train_phase(
        model, "bench", phase_cfg, loader, evals, device, progress=False, bf16=speed.bf16, compile=speed.compile
    )
    sync(device)
    t1 = time.perf_counter()
    out["suite"] = {
        "epoch_s": t1 - t0,
        "bf16": speed.bf16,
        "channels_last": speed.channels_last,
        "epoch_time_s_recorded": summary["history"][0]["epoch_time_s"],
    }
    out["ratio"] = out["reference"]["epoch_s"] / out["suite"]["epoch_s"]
    print(
        f"  {name} epoch ({n} train + {m} eval images): reference {out['reference']['epoch_s']:.1f} s, "
        f"suite {out['suite']['epoch_s']:.1f} s ({out['ratio']:.2f}x)",
        flush=True,
    )
    return out


def core_overhead(args, device: torch.device) -> dict:
    """The DPM controller's per-step overhead, from experiments/benchmarks/core_overhead.py."""
    spec = importlib.util.spec_from_file_location("core_overhead", Path(__file__).with_name("core_overhead.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--device",
            str(device),
            "--repeats",
            str(args.overhead_repeats),
            "--warmup",
            "1",
            "--batch",
            str(args.batch),
            "--out",
            str(Path(tmp) / "core_overhead.json"),
        ]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        result = module.main(argv)
    by = {c["self_rectifying"]: c for c in result["cases"]}
    return {
        **{
            k: result[k]
            for k in (
                "ratio",
                "plain_step_s_median",
                "controller_s_median",
                "targets_decaying",
                "targets_registered",
                "repeats",
                "batch",
                "step",
            )
        },
        "sp_ratio": by[False]["ratio"],
        "sp_controller_s_median": by[False]["controller_s_median"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="resnet56,vgg16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per block (default 6 CPU, 100 CUDA)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating reference/suite blocks per model")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 CPU, 20 CUDA)")
    ap.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default min(4, cores))")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="suite path with torch.compile")
    ap.add_argument("--overhead-repeats", type=int, default=None)
    ap.add_argument(
        "--data", type=Path, default=Path(os.environ.get("DPM_DATA_DIR", ROOT.parent / "shared" / "data")) / "cifar10"
    )
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DPM_CACHE_DIR", ROOT / ".cache" / "dpm")))
    ap.add_argument("--epoch-models", default="resnet56", help="models timed for an end-to-end epoch ('' = none)")
    ap.add_argument("--epoch-images", type=int, default=5000, help="training images of the end-to-end epoch")
    ap.add_argument("--eval-images", type=int, default=2000, help="test images evaluated after it")
    ap.add_argument("--smoke", action="store_true", help="seconds: synthetic images, batch 16, 1 step")
    ap.add_argument("--smoke-images", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results" / "benchmarks")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.smoke:
        args.batch, args.rounds = 16, 1
        args.steps, args.warmup = args.steps or 1, args.warmup if args.warmup is not None else 1
        args.workers = 1 if args.workers is None else args.workers
        args.overhead_repeats = args.overhead_repeats or 1
        args.epoch_images, args.eval_images = min(args.epoch_images, 32), min(args.eval_images, 32)
    args.steps = args.steps or (100 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 2)
    args.workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    args.overhead_repeats = args.overhead_repeats or (30 if cuda else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    split, test = load_split(args), load_test(args)
    results = []
    for name in args.models.split(","):
        print(f"{name}: batch {args.batch}, {args.rounds} x {args.steps} timed steps per path on {device}", flush=True)
        results.append(bench_model(name, split, args, device))
    epochs = [bench_epoch(name, split, test, args, device) for name in args.epoch_models.split(",") if name]
    overhead = core_overhead(args, device)
    result = {
        "benchmark": "throughput",
        "smoke": args.smoke,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "data": "synthetic" if args.smoke else str(args.data),
        "train_images": len(split),
        "models": results,
        "epochs": epochs,
        "dpm_overhead": overhead,
        "goals": GOALS,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_sha": CODE_SHA,
        "command": "python experiments/benchmarks/throughput.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"throughput_{device.type}" + ("_smoke" if args.smoke else "")
    write_atomic(args.out_dir / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    write_atomic(args.out_dir / f"{stem}.md", markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [
        f"# Training throughput: suite vs a plain torchvision loop ({r['device']})",
        "",
        f"{r['device_name']}, {r['cpu_count']} CPU cores, torch {r['torch']}, {r['threads']} torch threads; "
        f"data: {r['data']} ({r['train_images']} training images); load average "
        f"{r['load_avg_1m_before']} -> {r['load_avg_1m_after']}; git {r['git_sha']}.",
        "",
        f"Command: `{r['command'].strip()}`",
        "",
        "| model | batch | reference img/s | suite img/s | suite / reference |",
        "|---|---|---|---|---|",
    ]
    for m in r["models"]:
        lines.append(
            f"| {m['model']} | {m['batch']} | {m['reference_images_per_s']:.1f} | "
            f"{m['suite_images_per_s']:.1f} | {m['ratio']:.2f}x |"
        )
    if r.get("epochs"):
        lines += [
            "",
            "End to end, one epoch (DataLoader / SplitLoader batch assembly and augmentation, training, "
            "then evaluation; the reference's worker start-up included):",
            "",
            "| model | train images | eval images | reference s | suite s | reference / suite |",
            "|---|---|---|---|---|---|",
        ]
        for e in r["epochs"]:
            lines.append(
                f"| {e['model']} | {e['train_images']} | {e['eval_images']} | {e['reference']['epoch_s']:.1f} | "
                f"{e['suite']['epoch_s']:.1f} | {e['ratio']:.2f}x |"
            )
    m0 = r["models"][0]
    o = r["dpm_overhead"]
    lines += [
        "",
        f"Reference: torchvision transforms in a DataLoader with {m0['reference']['dataloader_workers']} "
        f"workers, fp32, `.item()` every step. Suite: data resident on the device as uint8, crop/flip/normalise "
        f"on the device, `dpm.train.train_phase` (fast={m0['suite']['fast']}, bf16={m0['suite']['bf16']}, "
        f"channels_last={m0['suite']['channels_last']}, compile={m0['suite']['compile']}). "
        f"{m0['steps_timed_each']} timed steps per path and model, in alternating blocks.",
        "",
        f"DPM controller overhead (ResNet-56, batch {o['batch']}, {o['targets_decaying']}/"
        f"{o['targets_registered']} channels decaying, against the suite's step: bf16={o['step']['bf16']}, "
        f"channels_last={o['step']['channels_last']}): with SR {o['controller_s_median'] * 1e3:.2f} ms per step "
        f"vs {o['plain_step_s_median'] * 1e3:.1f} ms = {o['ratio'] * 100:.2f}% (goal <= 1%); Smooth Pruning "
        f"alone {o['sp_controller_s_median'] * 1e3:.2f} ms = {o['sp_ratio'] * 100:.2f}% (goal <= 0.5%).",
        "",
        "Goals: the suite >= 3x the reference for ResNet-56 on CUDA, >= 2.5x on CPU (2 cores).",
    ]
    if r["smoke"]:
        lines += ["", "**Smoke run** (synthetic data, a step or two): the numbers mean nothing."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
