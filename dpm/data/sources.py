"""Where images come from: each source returns whole splits as uint8 tensors (N, C, H, W).

Small data sets (digits, CIFAR, synthetic) are held in memory whole: on 2 CPU cores decoding and
augmenting per image in DataLoader workers costs more than the model, and a resident tensor makes
the data order a pure function of (seed, epoch), which resume relies on. ImageNet is too large for
that and goes through `imagenet_folders` instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpm.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


@dataclass
class ImageSplit:
    """A split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "ImageSplit":
        return ImageSplit(self.images[index], self.labels[index])


def load_digits() -> tuple[ImageSplit, ImageSplit]:
    """scikit-learn's 1,797 8x8 digits, with a fixed stratified 20% test split."""
    from sklearn.datasets import load_digits as sk_load_digits  # deferred: sklearn takes a second to import

    bunch = sk_load_digits()
    # Pixel values are 0..16: scale to the uint8 range every other source uses.
    images = torch.from_numpy(np.clip(bunch.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    full = ImageSplit(images, labels)
    test_index = stratified_pick(labels, 360, seed=0)
    train_mask = torch.ones(len(labels), dtype=torch.bool)
    train_mask[test_index] = False
    return full.subset(train_mask.nonzero().squeeze(1)), full.subset(test_index)


def load_synthetic(
    num_classes: int, in_channels: int, image_size: int, n_train: int, n_test: int
) -> tuple[ImageSplit, ImageSplit]:
    """Learnable random images (one fixed noisy template per class); for smoke tests only."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(num_classes, in_channels, image_size, image_size, generator=g)

    def draw(n: int) -> ImageSplit:
        labels = torch.arange(n) % num_classes
        noisy = templates[labels] * 0.6 + torch.rand(n, in_channels, image_size, image_size, generator=g) * 0.4
        return ImageSplit((noisy * 255).to(torch.uint8), labels.long())

    return draw(n_train), draw(n_test)


def load_cifar(
    name: str, root: str | None, download: bool, cache_dir: str | None, bad_images: str = "fail"
) -> tuple[ImageSplit, ImageSplit]:
    """CIFAR-10/100 from an ImageFolder layout (train/<class>/, test/<class>/) or torchvision's format."""
    if not root:
        raise UserError(
            f"dataset.root is not set for {name}: set DPM_DATA_DIR to the folder holding "
            f"{name}/ or pass dataset.root=PATH"
        )
    root_path = Path(root).expanduser()
    if (root_path / "train").is_dir() and (root_path / "test").is_dir():
        return (
            load_image_folder(root_path / "train", cache_dir, bad_images),
            load_image_folder(root_path / "test", cache_dir, bad_images),
        )
    return load_torchvision_cifar(name, root_path, download)


def load_torchvision_cifar(name: str, root: Path, download: bool) -> tuple[ImageSplit, ImageSplit]:
    import torchvision  # deferred: only the CIFAR / ImageNet sources need torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if not (root / folder).is_dir() and not download:
        raise UserError(
            f"dataset.root={root} holds neither train/ and test/ image folders nor torchvision's {folder}/: "
            f"point DPM_DATA_DIR (or dataset.root) at the data, or allow a download with dataset.download=true"
        )
    try:
        splits = [cls(str(root), train=train, download=download) for train in (True, False)]
    except Exception as err:  # torchvision raises URLError/RuntimeError: say what to do instead
        raise UserError(
            f"could not load {name} from {root} ({type(err).__name__}: {err}); with no network, "
            f"point dataset.root at a local copy"
        ) from None
    return tuple(
        ImageSplit(
            torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets, dtype=torch.int64)
        )
        for s in splits
    )


def load_image_folder(folder: Path, cache_dir: str | None, bad_images: str = "fail") -> ImageSplit:
    """Decode an ImageFolder tree (class folders sorted alphabetically = label order) into memory.

    Decoding 60,000 JPEGs takes seconds; the result is cached as .npz keyed by the folder's path,
    file list (names, sizes, modification times) and `bad_images` policy, so it happens once per
    machine rather than once per run, and again after any file is added, removed or rewritten.
    A corrupt or truncated image is an error naming its path (`bad_images="fail"`), or is left out
    with a warning (`"skip"`); an empty class folder or a folder without class folders is an error.
    """
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{folder} has no class folders: expected the ImageFolder layout {folder}/<class>/*.jpg")
    files = []
    for label, c in enumerate(classes):
        found = [(f, label) for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise UserError(
                f"class folder {folder / c} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                f"remove it or add its images"
            )
        files += found
    key = cache_key(folder, files, bad_images)
    cache_file = Path(cache_dir) / "datasets" / f"{folder.parent.name}-{folder.name}-{key}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file) as z:
            return ImageSplit(torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]))
    decoded, labels, skipped = [], [], []
    for f, label in files:
        try:
            decoded.append(decode_image(f))
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for corrupt/truncated files
            if bad_images != "skip":
                raise UserError(
                    f"cannot decode image {f} ({err}): replace or delete it, or set "
                    f"dataset.bad_images=skip to leave such images out"
                ) from None
            skipped.append(f)
            continue
        labels.append(label)
    if skipped:
        log.warning(
            "%d unreadable image(s) left out of %s (dataset.bad_images=skip), e.g. %s", len(skipped), folder, skipped[0]
        )
    shapes = {a.shape for a in decoded}
    if len(shapes) > 1:
        raise UserError(
            f"images under {folder} differ in size ({', '.join(map(str, sorted(shapes)))}): resize them to one size"
        )
    images = np.stack(decoded).transpose(0, 3, 1, 2)
    labels = np.array(labels, dtype=np.int64)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, cache_file)
    return ImageSplit(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def cache_key(folder: Path, files: list, bad_images: str) -> str:
    """What the decoded copy of `folder` depends on: its path, every file's class folder, name,
    size and mtime, and the bad-image policy."""
    h = hashlib.sha1((str(folder.resolve()) + "\n" + bad_images).encode())
    for f, _ in files:
        st = f.stat()
        h.update(f"\n{f.parent.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def decode_image(path: Path) -> np.ndarray:
    """One image as an RGB uint8 array (H, W, 3); raises what PIL raises for a corrupt or truncated file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def imagenet_folders(root: str | None) -> tuple[Path, Path]:
    """ImageNet train/ and val/ ImageFolder roots (streamed from disk by a DataLoader)."""
    root_path = Path(root or "").expanduser()
    train, val = root_path / "train", root_path / "val"
    if not root or not train.is_dir() or not val.is_dir():
        raise UserError(
            f"dataset.root={root} must hold ImageNet as train/<wnid>/ and val/<wnid>/ image "
            f"folders (ImageNet is never downloaded): set DPM_DATA_DIR or dataset.root"
        )
    return train, val


def stratified_pick(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of n items with class proportions kept (sorted), reproducible from `seed`."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    classes = labels.unique()
    # Round-robin over classes in a seeded order: proportions stay equal up to one image per class.
    per_class = [order[labels[order] == c] for c in classes]
    picked, rank = [], 0
    while len(picked) < n:
        for idx in per_class:
            if rank < len(idx) and len(picked) < n:
                picked.append(int(idx[rank]))
        rank += 1
    return torch.tensor(sorted(picked), dtype=torch.int64)
