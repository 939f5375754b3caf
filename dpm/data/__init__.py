"""Data sets and loaders: CIFAR-10/100 (torchvision format or ImageFolder), ImageNet folders,
scikit-learn digits (embedded, real) and synthetic images (smoke tests only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dpm.data import sources
from dpm.data.loaders import (
    FolderLoader,
    SplitLoader,
    apply_crop_flip,
    draw_crop_flip,
    epoch_generator,
    random_crop_flip,
)
from dpm.data.sources import ImageSplit, imagenet_folders, stratified_pick
from dpm.errors import UserError

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagenet", "synthetic")

# The validation split and subsets must not change with the run's seed: paired seeds (base / +SP /
# +SR of one seed, and across seeds) all see the same images.
SPLIT_SEED = 0


@dataclass
class DataBundle:
    """The splits of one data set. `train`/`val`/`test` are ImageSplits, or folders for ImageNet."""

    name: str
    train: Any
    val: Any | None
    test: Any
    num_classes: int
    in_channels: int
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: bool

    @property
    def example_shape(self) -> tuple[int, int, int, int]:
        return (1, self.in_channels, self.image_size, self.image_size)


def build_data(cfg: Any, cache_dir: str | None = None) -> DataBundle:
    """Load the data set described by a `dataset` config node (see conf/dataset/)."""
    name = cfg.name
    if name not in DATASET_NAMES:
        raise UserError(f"unknown dataset.name '{name}'; valid: {', '.join(DATASET_NAMES)}")
    if name == "imagenet":
        train_dir, val_dir = imagenet_folders(cfg.root)
        if cfg.val_size:
            raise UserError("dataset.val_size is not supported for imagenet folders: set dataset.val_size=0")
        found = sum(1 for d in train_dir.iterdir() if d.is_dir())
        if found != cfg.num_classes:
            raise UserError(
                f"dataset.num_classes={cfg.num_classes} but {train_dir} has {found} class folders: "
                f"fix dataset.num_classes"
            )
        return DataBundle(
            name,
            train_dir,
            None,
            val_dir,
            cfg.num_classes,
            cfg.in_channels,
            cfg.image_size,
            cfg.mean,
            cfg.std,
            cfg.augment,
        )
    if name == "digits":
        train, test = sources.load_digits()
    elif name == "synthetic":
        train, test = sources.load_synthetic(
            cfg.num_classes, cfg.in_channels, cfg.image_size, cfg.synthetic_train, cfg.synthetic_test
        )
    else:
        train, test = sources.load_cifar(name, cfg.root, cfg.download, cache_dir, cfg.bad_images)
    found_classes = int(train.labels.max()) + 1
    if found_classes != cfg.num_classes:
        raise UserError(
            f"dataset.num_classes={cfg.num_classes} but {name} has {found_classes} classes: fix dataset.num_classes"
        )
    if tuple(train.images.shape[1:]) != (cfg.in_channels, cfg.image_size, cfg.image_size):
        raise UserError(
            f"{name} images are {tuple(train.images.shape[1:])} but the config says "
            f"in_channels={cfg.in_channels}, image_size={cfg.image_size}: fix dataset.*"
        )
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise UserError(f"dataset.val_size={cfg.val_size} leaves no training images ({len(train)} in all)")
        val_index = stratified_pick(train.labels, cfg.val_size, SPLIT_SEED)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[val_index] = False
        train, val = train.subset(keep.nonzero().squeeze(1)), train.subset(val_index)
    if cfg.train_subset:
        train = train.subset(stratified_pick(train.labels, cfg.train_subset, SPLIT_SEED))
    if cfg.test_subset:
        test = test.subset(stratified_pick(test.labels, cfg.test_subset, SPLIT_SEED))
    return DataBundle(
        name,
        train,
        val,
        test,
        cfg.num_classes,
        cfg.in_channels,
        cfg.image_size,
        list(cfg.mean),
        list(cfg.std),
        cfg.augment,
    )


def train_loader(
    data: DataBundle,
    batch_size: int,
    device: torch.device,
    seed: int,
    phase: str,
    max_steps: int = 0,
    channels_last: bool = False,
    num_workers: int = 0,
):
    """Shuffled, augmented batches of the training split for one phase."""
    if isinstance(data.train, Path):
        return FolderLoader(
            data.train,
            batch_size,
            data.mean,
            data.std,
            data.image_size,
            device,
            train=True,
            seed=seed,
            phase=phase,
            num_workers=num_workers,
            max_steps=max_steps,
            channels_last=channels_last,
        )
    return SplitLoader(
        data.train,
        batch_size,
        data.mean,
        data.std,
        device,
        train=True,
        augment=data.augment,
        seed=seed,
        phase=phase,
        max_steps=max_steps,
        channels_last=channels_last,
    )


def eval_loader(
    data: DataBundle,
    split: str,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
    num_workers: int = 0,
):
    """Batches of the `val` or `test` split in a fixed order, without augmentation."""
    source = getattr(data, split)
    if isinstance(source, Path):
        return FolderLoader(
            source,
            batch_size,
            data.mean,
            data.std,
            data.image_size,
            device,
            num_workers=num_workers,
            channels_last=channels_last,
        )
    return SplitLoader(source, batch_size, data.mean, data.std, device, channels_last=channels_last)


__all__ = [
    "DATASET_NAMES",
    "DataBundle",
    "ImageSplit",
    "SplitLoader",
    "FolderLoader",
    "build_data",
    "train_loader",
    "eval_loader",
    "epoch_generator",
    "random_crop_flip",
    "draw_crop_flip",
    "apply_crop_flip",
    "stratified_pick",
]
