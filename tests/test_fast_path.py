"""The fast data path: on-device crop/flip against torchvision's transforms, reproducibility, DDP
shards of the global batch, speed settings per device, and the decoded-dataset disk cache."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from dpm.config import PhaseConfig
from dpm.data import sources
from dpm.data.loaders import SplitLoader, apply_crop_flip, draw_crop_flip, epoch_generator, random_crop_flip
from dpm.data.sources import ImageSplit
from dpm.train import resolve_speed

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def coded_images(b: int, size: int = 32) -> torch.Tensor:
    """Images whose pixel (r, c) holds r + 1 in channel 0 and c + 1 in channel 1 (0 only in the padding)."""
    rows = torch.arange(1, size + 1, dtype=torch.float32).view(1, size, 1).expand(b, size, size)
    cols = torch.arange(1, size + 1, dtype=torch.float32).view(1, 1, size).expand(b, size, size)
    return torch.stack([rows, cols, torch.zeros_like(rows)], 1)


def read_offsets(out: torch.Tensor, padding: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flip) of crops of `coded_images`, from a pixel that is inside the image for any offset."""
    mid = out.shape[-1] // 2
    row = out[:, 0, mid, :]  # one output row: the source row is constant along it
    cols = out[:, 1, mid, :]
    dy = (out[:, 0, mid, mid] - 1 - mid + padding).long()
    flip = cols[:, mid + 1] < cols[:, mid]
    src_col = torch.where(flip, cols[:, out.shape[-1] - 1 - mid], cols[:, mid])
    dx = (src_col - 1 - mid + padding).long()
    assert ((row == row[:, mid : mid + 1]) | (row == 0)).all()  # zero only in the padding
    return dy, dx, flip


def test_crop_flip_matches_torchvision_for_the_same_draws():
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(3)
    images = torch.rand(20, 3, 32, 32, generator=g)
    dy, dx, flip = draw_crop_flip(20, 4, g)
    ours = apply_crop_flip(images, 4, dy, dx, flip)
    for i in range(20):
        ref = TF.crop(TF.pad(images[i], [4]), int(dy[i]), int(dx[i]), 32, 32)  # RandomCrop(32, padding=4)
        if flip[i]:
            ref = TF.hflip(ref)
        assert torch.equal(ours[i], ref)


def test_crop_flip_distribution_matches_torchvision_transforms():
    import torchvision.transforms as T

    n = 4000
    images = coded_images(n)
    ours = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    tv = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    theirs = torch.stack([tv(img) for img in images])
    assert ours.shape == theirs.shape == (n, 3, 32, 32)
    assert ours.min() >= 0 and ours.max() <= 32 and ours.dtype == theirs.dtype
    for out in (ours, theirs):
        dy, dx, flip = read_offsets(out)
        assert dy.min() == 0 and dy.max() == 8 and dx.min() == 0 and dx.max() == 8  # offsets in range, all used
        assert abs(flip.float().mean().item() - 0.5) < 0.04  # ~0.5 (4 sigma: 0.032)
        for offsets in (dy, dx):
            freq = torch.bincount(offsets, minlength=9).float() / n
            assert (freq - 1 / 9).abs().max() < 0.03  # uniform over 0..8
        # Padding is black: the zero rows/columns appear exactly where the offset says.
        zero_top = out[:, 0, 0, 16] == 0
        assert torch.equal(zero_top, dy < 4)


def test_augmented_batches_are_identical_for_a_seed_and_differ_across_epochs():
    split = ImageSplit(torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.arange(100) % 10)

    def batches(seed, epoch):
        loader = SplitLoader(split, 32, MEAN, STD, train=True, augment=True, seed=seed, phase="finetune")
        loader.set_epoch(epoch)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b = batches(1, 0), batches(1, 0)
    assert len(a) == 3 + 1 and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], batches(1, 1)[0][0]) and not torch.equal(a[0][0], batches(2, 0)[0][0])
    x = a[0][0]
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert x.dtype == torch.float32 and x.shape == (32, 3, 32, 32)
    assert ((x >= low.view(1, 3, 1, 1) - 1e-6) & (x <= high.view(1, 3, 1, 1) + 1e-6)).all()


def test_batches_equal_the_per_step_draws_of_the_plain_loader():
    """Drawing the epoch's augmentation up front keeps the random stream: same batches as drawing per step."""
    split = ImageSplit(torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8), torch.arange(70) % 10)
    loader = SplitLoader(split, 16, MEAN, STD, train=True, augment=True, seed=5, phase="pretrain")
    loader.set_epoch(2)
    g = epoch_generator(5, "pretrain", 2)
    order = torch.randperm(70, generator=g)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    got = list(loader)
    assert len(got) == 5  # 4 full batches and the last 6 images
    for step, (x, y) in enumerate(got):
        index = order[step * 16 : (step + 1) * 16]
        expected = (random_crop_flip(split.images[index].float() / 255, 4, g) - mean) / std
        assert torch.equal(y, split.labels[index]) and torch.allclose(x, expected, atol=1e-6)


def test_ddp_ranks_take_disjoint_slices_of_the_same_global_batch():
    split = ImageSplit(torch.randint(0, 256, (90, 3, 32, 32), dtype=torch.uint8), torch.arange(90) % 10)
    one = list(SplitLoader(split, 32, MEAN, STD, train=True, augment=True, seed=1, phase="finetune"))
    ranks = [
        SplitLoader(split, 32, MEAN, STD, train=True, augment=True, seed=1, phase="finetune", rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 3
    shards = [r.shard_indices(0) for r in ranks]
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    evals = [SplitLoader(split, 25, MEAN, STD, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([y for e in evals for _, y in e]), split.labels)


def test_speed_settings_per_device(monkeypatch):
    import dpm.train

    # A CPU without native bf16: the plain fp32 NCHW loop.
    monkeypatch.setattr(dpm.train, "cpu_bf16_native", lambda: (False, "cpu capability: no avx512_bf16 or amx"))
    cpu = resolve_speed({}, torch.device("cpu"))
    assert (cpu.fast, cpu.bf16, cpu.channels_last, cpu.compile, cpu.eval_batch_size) == (
        False,
        False,
        False,
        False,
        256,
    )
    assert cpu.basis == "cpu capability: no avx512_bf16 or amx"
    # A CPU with native bf16: the fast path, unless a key says otherwise (explicit values win).
    monkeypatch.setattr(dpm.train, "cpu_bf16_native", lambda: (True, "cpu capability: avx512_bf16"))
    cpu = resolve_speed({}, torch.device("cpu"))
    assert (cpu.fast, cpu.bf16, cpu.channels_last, cpu.eval_batch_size) == (True, True, True, 256)
    assert cpu.basis == "cpu capability: avx512_bf16"
    for keys, expected in (
        ({"bf16": False}, (True, False, True)),
        ({"fast": False}, (False, False, False)),
        ({"fast": False, "channels_last": True}, (False, False, True)),
    ):
        got = resolve_speed(keys, torch.device("cpu"))
        assert (got.fast, got.bf16, got.channels_last) == expected, keys
    cuda = resolve_speed({}, torch.device("cuda"))
    assert (cuda.fast, cuda.bf16, cuda.channels_last, cuda.eval_batch_size) == (True, True, True, 1024)
    slow = resolve_speed({"fast": False}, torch.device("cuda"))
    assert (slow.bf16, slow.channels_last) == (False, False)
    mixed = resolve_speed({"bf16": False, "eval_batch_size": 64, "compile": True}, torch.device("cuda"))
    assert (mixed.fast, mixed.bf16, mixed.channels_last, mixed.eval_batch_size, mixed.compile) == (
        True,
        False,
        True,
        64,
        True,
    )


def test_cpu_bf16_capability_is_read_from_torch():
    from dpm.train import cpu_bf16_native

    native, basis = cpu_bf16_native()
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert native == ("avx512_bf16" in flags or "amx_tile" in flags)
    assert basis.startswith("cpu capability:")


def test_cpu_autocast_runs_the_forward_in_bf16_and_keeps_everything_else_fp32():

    from dpm.train import autocast, train_phase

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    with autocast(torch.device("cpu"), True):
        assert net[0](x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), False):
        assert net[0](x).dtype == torch.float32
    split = ImageSplit(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.arange(32) % 10)
    loader = SplitLoader(split, 16, MEAN, STD, train=True, augment=False, seed=0, phase="pretrain", channels_last=True)
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    phase_cfg = PhaseConfig(epochs=1, schedule="constant", batch_size=16)
    train_phase(net, "pretrain", phase_cfg, loader, {}, torch.device("cpu"), progress=False, bf16=True)
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(b.dtype == torch.float32 for b in net.buffers() if b.is_floating_point())
    assert net[1].num_batches_tracked.item() == 2 and net[1].running_var.ne(1).any()


def test_cpu_fast_run_records_its_path_and_is_bitwise_reproducible(tmp_path):
    from conftest import compose
    from dpm.checkpoint import load_checkpoint
    from dpm.run import run

    args = ["experiment=smoke", "trainer.fast=true", "pruner=depgraph", "dpm=sp", "dpm.N=2"]
    runs = []
    for name in ("a", "b"):
        cfg = compose([*args, f"cache_dir={tmp_path / name / 'cache'}"])
        runs.append(run(cfg, tmp_path / name / "run"))
    a, b = runs
    assert a["status"] == b["status"] == "complete"
    assert (a["fast"], a["bf16"], a["channels_last"], a["fast_basis"]) == (True, True, True, "trainer.fast=True")

    def numbers(m: dict) -> list:  # every loss and accuracy of both phases, wall times left out
        return [
            {k: v for k, v in r.items() if k != "epoch_time_s"}
            for ph in ("pretrain", "finetune")
            for r in m["history"][ph]
        ]

    assert numbers(a) == numbers(b) and numbers(a) and a["top1_final"] == b["top1_final"]
    wa, wb = (load_checkpoint(m["pretrain_checkpoint"])["model"] for m in runs)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_pretrain_cache_key_separates_fp32_nchw_from_the_fast_path():
    from conftest import compose
    from dpm.run import pretrain_key_fields

    keys = {
        (bf16, cl): pretrain_key_fields(
            compose(["experiment=smoke", f"trainer.bf16={bf16}", f"trainer.channels_last={cl}"])
        )
        for bf16 in ("true", "false")
        for cl in ("true", "false")
    }
    assert len({json_key(k) for k in keys.values()}) == 4
    fast = pretrain_key_fields(compose(["experiment=smoke", "trainer.fast=true"]))
    assert json_key(fast) == json_key(keys[("true", "true")])


def json_key(fields: dict) -> str:
    import json

    return json.dumps(fields, sort_keys=True, default=str)


def test_resuming_a_checkpoint_of_other_numerics_is_refused(tmp_path):
    from dpm.errors import UserError
    from dpm.train import train_phase

    split = ImageSplit(torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8), torch.arange(32) % 10)
    phase_cfg = PhaseConfig(epochs=1, schedule="constant", batch_size=16)

    def net(channels_last: bool):
        torch.manual_seed(0)
        m = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 10),
        )
        return m.to(memory_format=torch.channels_last) if channels_last else m

    def phase(epochs: int, bf16: bool, channels_last: bool):
        loader = SplitLoader(split, 16, MEAN, STD, train=True, seed=0, phase="pretrain", channels_last=channels_last)
        cfg = dataclasses.replace(phase_cfg, epochs=epochs)
        return train_phase(
            net(channels_last),
            "pretrain",
            cfg,
            loader,
            {},
            torch.device("cpu"),
            checkpoint_path=tmp_path / "last.pt",
            progress=False,
            bf16=bf16,
        )

    phase(1, bf16=False, channels_last=False)  # fp32 NCHW, one epoch checkpointed
    for bf16, cl in ((True, True), (True, False), (False, True)):
        with pytest.raises(UserError, match="trainer.bf16=false trainer.channels_last=false"):
            phase(2, bf16=bf16, channels_last=cl)
    assert phase(2, bf16=False, channels_last=False)["epochs"] == 2  # the same numerics continue


def make_folder(root, n_per_class: int = 3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_decoded_cache_is_used_on_the_second_load_and_invalidated_when_the_source_changes(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "data" / "train")
    cache = tmp_path / "cache"
    decoded = []
    real_decode = sources.decode_image
    monkeypatch.setattr(sources, "decode_image", lambda p: decoded.append(p.name) or real_decode(p))

    first = sources.load_image_folder(folder, str(cache))
    assert len(decoded) == 6 and len(list((cache / "datasets").glob("*.npz"))) == 1
    second = sources.load_image_folder(folder, str(cache))
    assert len(decoded) == 6  # read from the cache: nothing decoded
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)

    # A rewritten image (same name, same size) with a new mtime: decoded again, new content seen.
    from PIL import Image

    target = folder / "b" / "1.png"
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third = sources.load_image_folder(folder, str(cache))
    assert len(decoded) == 12 and (third.images[4] == 7).all()
    # Only the mtime changes: still a different source.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    sources.load_image_folder(folder, str(cache))
    assert len(decoded) == 18
    # An added image: decoded again, and the split grows.
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "a" / "9.png")
    assert len(sources.load_image_folder(folder, str(cache))) == 7 and len(decoded) == 25
    assert len(sources.load_image_folder(folder, str(cache))) == 7 and len(decoded) == 25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_fast_path_defaults_and_compile(tmp_path):
    from conftest import compose
    from dpm.run import run

    m = run(
        compose(
            [
                "experiment=smoke",
                "pruner=depgraph",
                "dpm=sp",
                "dpm.N=2",
                "trainer.device=cuda",
                "trainer.deterministic=false",
            ]
        ),
        tmp_path / "fast",
    )
    assert m["status"] == "complete" and m["fast"] and m["bf16"] and m["channels_last"]
    m = run(
        compose(["experiment=smoke", "trainer.device=cuda", "trainer.compile=true", "trainer.deterministic=false"]),
        tmp_path / "compiled",
    )
    assert m["status"] == "complete" and m["compile"]
