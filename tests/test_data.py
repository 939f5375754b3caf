"""Data sources, splits and the batch augmentation."""

from __future__ import annotations

import pytest
import torch

from conftest import CIFAR10, compose
from dpm.data import SplitLoader, build_data, random_crop_flip, stratified_pick
from dpm.data.sources import ImageSplit, load_image_folder
from dpm.errors import UserError


def test_digits_is_real_embedded_data_with_a_fixed_test_split():
    data = build_data(compose(["dataset=digits"]).dataset)
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 360
    assert data.train.images.shape[1:] == (1, 8, 8) and data.train.images.dtype == torch.uint8
    assert torch.bincount(data.test.labels).tolist() == [36] * 10
    again = build_data(compose(["dataset=digits", "seed=5"]).dataset)
    assert torch.equal(again.test.images, data.test.images)  # the run seed does not move the split


def test_validation_split_is_held_out_of_training():
    data = build_data(compose(["dataset=digits", "dataset.val_size=200"]).dataset)
    assert len(data.val) == 200 and len(data.train) == 1797 - 360 - 200
    train_rows = {tuple(x.flatten().tolist()) for x in data.train.images}
    overlap = sum(tuple(x.flatten().tolist()) in train_rows for x in data.val.images)
    assert overlap < 10  # digits has a few exact duplicate images; a leak would be all 200
    assert torch.bincount(data.val.labels).min() >= 19


def test_stratified_pick_keeps_class_proportions():
    labels = torch.arange(1000) % 4
    picked = stratified_pick(labels, 100, seed=3)
    assert len(picked) == 100 and len(set(picked.tolist())) == 100
    assert torch.bincount(labels[picked]).tolist() == [25, 25, 25, 25]
    assert torch.equal(picked, stratified_pick(labels, 100, seed=3))
    assert not torch.equal(picked, stratified_pick(labels, 100, seed=4))


def test_random_crop_flip_matches_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 8, 8, generator=g)
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    dy = torch.randint(0, 5, (6,), generator=g)
    dx = torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        ref = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    assert flip.any() and not flip.all()


def test_epoch_order_depends_only_on_seed_and_epoch():
    split = ImageSplit(torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50) % 5)

    def labels(seed, epoch):
        loader = SplitLoader(split, 16, [0.5] * 3, [0.5] * 3, train=True, augment=True, seed=seed, phase="p")
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader])

    assert torch.equal(labels(0, 3), labels(0, 3))
    assert not torch.equal(labels(0, 3), labels(0, 4))
    assert not torch.equal(labels(0, 3), labels(1, 3))
    assert len(labels(0, 0)) == 50  # last batch of 2 kept


def test_train_loader_drops_a_last_batch_of_one():
    split = ImageSplit(torch.zeros(33, 1, 4, 4, dtype=torch.uint8), torch.zeros(33, dtype=torch.long))
    loader = SplitLoader(split, 16, [0.0], [1.0], train=True)
    assert len(loader) == 2 and sum(len(y) for _, y in loader) == 32


def test_num_classes_mismatch_is_refused():
    cfg = compose(["dataset=digits", "dataset.num_classes=12", "dataset.name=synthetic"])
    cfg.dataset.name = "digits"
    with pytest.raises(UserError, match="dataset.num_classes=12 but digits has 10 classes"):
        build_data(cfg.dataset)


def test_missing_cifar_root_names_the_fix(tmp_path):
    cfg = compose(["dataset=cifar10", f"dataset.root={tmp_path / 'nothing'}"]).dataset
    with pytest.raises(UserError, match="DPM_DATA_DIR .*dataset.download=true"):
        build_data(cfg)


def test_image_folder_layout_and_decode_cache(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, name in enumerate(["b_cls", "a_cls"]):
            folder = tmp_path / "tiny10" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (c * 100, i * 50, 7)).save(folder / f"{i}.png")
    cache = tmp_path / "cache"
    split = load_image_folder(tmp_path / "tiny10" / "train", str(cache))
    assert split.images.shape == (6, 3, 32, 32)
    assert split.labels.tolist() == [0, 0, 0, 1, 1, 1]  # classes sorted alphabetically: a_cls = 0
    assert split.images[0, 0, 0, 0] == 100 and split.images[3, 0, 0, 0] == 0
    assert len(list(cache.glob("datasets/*.npz"))) == 1
    again = load_image_folder(tmp_path / "tiny10" / "train", str(cache))
    assert torch.equal(again.images, split.images)


@pytest.mark.usefixtures("cifar10")  # skips without the data, fails under DPM_REQUIRE_DATA=1
@pytest.mark.slow
def test_real_cifar10_folder_loads_in_label_order(decode_cache):
    cfg = compose(
        [
            "dataset=cifar10",
            f"dataset.root={CIFAR10}",
            "dataset.train_subset=500",
            "dataset.test_subset=200",
            "dataset.val_size=100",
        ]
    ).dataset
    data = build_data(cfg, cache_dir=str(decode_cache))
    assert (len(data.train), len(data.val), len(data.test)) == (500, 100, 200)
    assert data.train.images.shape[1:] == (3, 32, 32)
    assert torch.bincount(data.test.labels).tolist() == [20] * 10
    # real images: the per-channel means are CIFAR-10's (~0.49, 0.48, 0.45), not noise
    means = data.train.images.float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.03)


def test_imagenet_style_folder_run(tmp_path):
    """dataset=imagenet streams an ImageFolder root (train/, val/) through a DataLoader."""
    from PIL import Image

    from dpm.run import run

    for split in ("train", "val"):
        for c in range(3):
            folder = tmp_path / "imagenet" / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40, 40), (80 * c, 20 * i, 30)).save(folder / f"{i}.JPEG")
    cfg = compose(
        [
            "experiment=smoke",
            "dataset=imagenet",
            f"dataset.root={tmp_path / 'imagenet'}",
            "dataset.num_classes=3",
            "dataset.image_size=32",
            "trainer.pretrain.batch_size=6",
            "trainer.finetune.epochs=0",
            "pretrain.cache=false",
        ]
    )
    from dpm.data import build_data, eval_loader, train_loader

    data = build_data(cfg.dataset)
    x, y = next(iter(train_loader(data, 6, torch.device("cpu"), seed=0, phase="pretrain")))
    assert x.shape == (6, 3, 32, 32) and set(y.tolist()) <= {0, 1, 2}
    assert sum(len(y) for _, y in eval_loader(data, "test", 4, torch.device("cpu"))) == 18
    metrics = run(cfg, tmp_path / "run")
    assert metrics["status"] == "complete" and metrics["train_size"] is None
    cfg.dataset.num_classes = 5
    with pytest.raises(UserError, match="dataset.num_classes=5 but .* has 3 class folders"):
        build_data(cfg.dataset)
