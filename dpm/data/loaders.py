"""Batches from in-memory splits, with CIFAR augmentation done on whole batches.

The order and the augmentation of an epoch are drawn from a generator seeded by (seed, epoch), so
an epoch's batches are the same whether the run started fresh or resumed from a checkpoint.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from dpm.data.sources import ImageSplit


def epoch_generator(seed: int, phase: str, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, phase, epoch)."""
    phase_code = sum((i + 1) * ord(c) for i, c in enumerate(phase))
    return torch.Generator().manual_seed((seed * 1_000_003 + phase_code * 10_007 + epoch) % (2**63))


def random_crop_flip(images: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip, per image, for a whole batch at once.

    Same distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip on [0, 1]
    images (padding is black, before normalisation).
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g).to(images.device)
    flip = (torch.rand(b, generator=g) < 0.5).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)[None, :]
    cols = dx[:, None] + torch.arange(w, device=images.device)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # padded[batch, :, rows, cols] -> (B, H, W, C)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


class SplitLoader:
    """Iterates (images, labels) batches of an in-memory split, normalised, on `device`."""

    def __init__(self, split: ImageSplit, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str = "cpu", train: bool = False, augment: bool = False,
                 seed: int = 0, phase: str = "eval", max_steps: int = 0, channels_last: bool = False):
        self.split, self.batch_size = split, batch_size
        self.train, self.augment = train, augment
        self.seed, self.phase, self.max_steps = seed, phase, max_steps
        self.device = torch.device(device)
        self.channels_last = channels_last
        c = split.images.shape[1]
        self.mean = torch.tensor(list(mean) or [0.0] * c, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std) or [1.0] * c, device=self.device).view(1, -1, 1, 1)
        self.epoch = 0
        # Keep the uint8 copy on the device once: no per-step host-to-device image traffic.
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        steps = n // self.batch_size if self.train else -(-n // self.batch_size)
        if self.train and n % self.batch_size > 1:
            steps += 1  # a last batch of one image would break BatchNorm in train mode: it is dropped
        return min(steps, self.max_steps) if self.max_steps else steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.seed, self.phase, self.epoch)
        n = len(self.split)
        order = torch.randperm(n, generator=g).to(self.device) if self.train else torch.arange(n, device=self.device)
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = self.images[index].float().div_(255)
            if self.augment:
                x = random_crop_flip(x, 4, g)
            x = (x - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[index]


class FolderLoader:
    """ImageNet-style streaming loader over an ImageFolder, with the same interface as SplitLoader."""

    def __init__(self, folder, batch_size: int, mean: Sequence[float], std: Sequence[float], image_size: int,
                 device: torch.device | str = "cpu", train: bool = False, seed: int = 0, phase: str = "eval",
                 num_workers: int = 4, max_steps: int = 0, channels_last: bool = False):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        tf = ([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if train
              else [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)])
        self.dataset = ImageFolder(str(folder), T.Compose(tf + [T.ToTensor(), T.Normalize(mean, std)]))
        self.batch_size, self.train, self.seed, self.phase = batch_size, train, seed, phase
        self.num_workers, self.max_steps = num_workers, max_steps
        self.device, self.channels_last, self.epoch = torch.device(device), channels_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        steps = (len(self.dataset) // self.batch_size if self.train
                 else -(-len(self.dataset) // self.batch_size))
        return min(steps, self.max_steps) if self.max_steps else steps

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.train, drop_last=self.train,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            generator=epoch_generator(self.seed, self.phase, self.epoch), persistent_workers=False)
        for step, (x, y) in enumerate(loader):
            if self.max_steps and step >= self.max_steps:
                break
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
