"""The training loop: exact resume, schedules, NaN guard, BN recalibration, real CIFAR-10."""

from __future__ import annotations

import pytest
import torch

from conftest import CIFAR10, compose
from dpm.data import SplitLoader
from dpm.data.sources import load_synthetic
from dpm.errors import UserError
from dpm.models import build_model
from dpm.run import run
from dpm.train import make_optimizer, make_scheduler, onednn_conv_safe, recalibrate_bn, train_phase


def phase_cfg(**kw):
    return compose(["experiment=smoke", *[f"trainer.pretrain.{k}={v}" for k, v in kw.items()]]).trainer.pretrain


def setup(seed=0):
    torch.manual_seed(seed)
    train, test = load_synthetic(4, 3, 8, 96, 32)
    model = build_model("tiny_cnn", 4)
    loader = SplitLoader(train, 16, [0.5] * 3, [0.25] * 3, train=True, augment=True, seed=seed, phase="pretrain")
    return model, loader, {"test": SplitLoader(test, 64, [0.5] * 3, [0.25] * 3)}


class InterruptAt:
    """A step hook that interrupts training at its n-th optimizer step (mid-epoch)."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def after_step(self, optimizer):
        self.seen += 1
        if self.seen == self.step:
            raise KeyboardInterrupt


def test_resume_from_a_checkpoint_is_bitwise(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        model, loader, evals = setup()
        full = train_phase(model, "pretrain", phase_cfg(epochs=4), loader, evals, torch.device("cpu"), progress=False)
        reference = {k: v.clone() for k, v in model.state_dict().items()}

        model, loader, evals = setup()
        ckpt = tmp_path / "ckpt.pt"
        with pytest.raises(KeyboardInterrupt):  # killed in the middle of epoch 3
            train_phase(
                model,
                "pretrain",
                phase_cfg(epochs=4),
                loader,
                evals,
                torch.device("cpu"),
                ckpt,
                hooks=[InterruptAt(len(loader) * 2 + 3)],
                progress=False,
            )
        torch.manual_seed(999)  # a restarted process has other RNG state: the checkpoint must restore it
        model, loader, evals = setup(seed=0)
        resumed = train_phase(
            model, "pretrain", phase_cfg(epochs=4), loader, evals, torch.device("cpu"), ckpt, progress=False
        )
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    # Epochs 3-4 were redone after the interruption: identical weights to the uninterrupted run only
    # if data order, augmentation, optimizer, scheduler and RNG were all restored.
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert resumed["history"][-1]["test_top1"] == full["history"][-1]["test_top1"]


def test_step_and_cosine_schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer(torch.nn.Linear(1, 1), phase_cfg(lr=0.1))
    step = make_scheduler(opt, compose(["experiment=smoke", "trainer=cifar"]).trainer.pretrain)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        step.step()
    assert lrs[0] == 0.1 and lrs[119] == 0.1 and abs(lrs[120] - 0.01) < 1e-12 and abs(lrs[199] - 1e-4) < 1e-12
    opt = torch.optim.SGD([p], lr=0.2)
    cos = make_scheduler(opt, phase_cfg(epochs=10, schedule="cosine"))
    for _ in range(10):
        opt.step()
        cos.step()
    assert abs(opt.param_groups[0]["lr"]) < 1e-12


def test_nan_loss_is_one_clear_error():
    model, loader, evals = setup()
    with pytest.raises(
        UserError, match=r"pretrain: the loss became NaN/inf at step 1 \(epoch 1\).*lower trainer.pretrain.lr"
    ):
        train_phase(model, "pretrain", phase_cfg(epochs=1, lr=1e30), loader, evals, torch.device("cpu"), progress=False)


def test_recalibrate_bn_restores_running_statistics():
    model, loader, _ = setup()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.momentum = None  # exact average over the epoch's batches: what recalibration must reproduce
    model.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    good_mean = bn.running_mean.clone()
    bn.momentum = 0.1
    bn.running_mean.fill_(100.0)
    model.eval()
    recalibrate_bn(model, loader, batches=100)
    assert not model.training  # mode restored
    assert torch.allclose(bn.running_mean, good_mean, atol=1e-5)
    assert bn.momentum == 0.1


@pytest.mark.usefixtures("cifar10")  # skips without the data, fails under DPM_REQUIRE_DATA=1
@pytest.mark.slow
def test_short_real_cifar10_run_is_above_chance(tmp_path, decode_cache):
    cfg = compose(
        [
            "pruner=none",
            "dataset=cifar10",
            f"dataset.root={CIFAR10}",
            "model=resnet20",
            "trainer=cpu_debug",
            "trainer.max_steps_per_epoch=0",
            "dataset.train_subset=800",
            "dataset.test_subset=500",
            "trainer.pretrain.epochs=6",
            "trainer.pretrain.batch_size=32",
            "trainer.pretrain.lr=0.05",
            "trainer.finetune.epochs=0",
            f"cache_dir={decode_cache}",
            "pretrain.cache=false",
        ]
    )
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "complete"
    assert metrics["top1_final"] > 20.0, metrics["top1_final"]  # chance is 10%


def test_mid_epoch_start_step_continues_the_epochs_batches(tmp_path):
    """A loader resumed at step k of an epoch yields that epoch's batches from k on: in memory
    (images and augmentation equal) and from an image folder (the same images in the same order)."""
    from PIL import Image

    from dpm.data import FolderLoader

    split, _ = load_synthetic(10, 3, 8, 40, 8)
    loader = SplitLoader(split, 8, (0.5,) * 3, (0.25,) * 3, train=True, augment=True, seed=3, phase="finetune")
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, 3)
    resumed = list(loader)
    assert len(resumed) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader.set_epoch(3)  # the next epoch starts at its first step again
    assert len(list(loader)) == len(full)

    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(9):
            Image.new("RGB", (8, 8), (25 * i, 100 * c, 7)).save(tmp_path / f"class{c}" / f"{i}.png")
    folder = FolderLoader(tmp_path, 4, (0.5,) * 3, (0.25,) * 3, 8, train=True, seed=1, phase="pretrain", num_workers=0)
    folder.set_epoch(1)
    whole = folder.indices()
    assert sorted(whole) == list(range(18)) and whole != list(range(18))
    folder.set_epoch(1, 2)
    assert folder.indices() == whole[8:]
    labels = [y for _, y in folder]
    assert len(labels) == len(folder) - 2
    assert torch.cat(labels).tolist() == [folder.dataset.targets[i] for i in whole[8:16]]


def test_checkpoint_every_minutes_reads_the_clock_only_on_poll_steps():
    import time

    from dpm.phase import CHECKPOINT_POLL, checkpoint_due

    long_ago, now = time.time() - 3600, time.time()
    assert checkpoint_due(CHECKPOINT_POLL, long_ago, 0, 5.0)
    assert not checkpoint_due(CHECKPOINT_POLL + 1, long_ago, 0, 5.0)  # between polls
    assert not checkpoint_due(CHECKPOINT_POLL, now, 0, 5.0)  # not yet 5 minutes
    assert checkpoint_due(6, now, 3, 0.0) and not checkpoint_due(7, now, 3, 0.0)
    assert not checkpoint_due(CHECKPOINT_POLL, long_ago, 0, 0.0)  # off


def test_onednn_convolutions_are_turned_off_on_an_avx2_only_cpu(monkeypatch):
    # torch 2.14.1's oneDNN AVX2 1x1 backward-weights kernel writes past the weight gradient for
    # pruned channel counts (valgrind; CI died of it with "double free or corruption").
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)  # put back as it was afterwards
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert onednn_conv_safe() and torch.backends.mkldnn.enabled
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not onednn_conv_safe() and not torch.backends.mkldnn.enabled
    # Convolutions still train, on torch's own kernels: a pruned 1x1 conv's weight gradient.
    conv = torch.nn.Conv2d(32, 41, 1, stride=2, bias=False)
    x = torch.randn(4, 32, 8, 8)
    conv(x).sum().backward()
    expected = x[:, :, ::2, ::2].sum(dim=(0, 2, 3)).expand(41, 32).reshape(41, 32, 1, 1)
    assert torch.allclose(conv.weight.grad, expected, atol=1e-4)
