"""Batches from in-memory splits, with CIFAR augmentation done on whole batches.

The order and the augmentation of an epoch are drawn from a generator seeded by (seed, epoch), so
an epoch's batches are the same whether the run started fresh or resumed from a checkpoint, and a
run resumed inside an epoch (`set_epoch(epoch, start_step)`) continues with that epoch's remaining
batches.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from dpm import distributed
from dpm.data.sources import ImageSplit


def epoch_generator(seed: int, phase: str, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, phase, epoch)."""
    phase_code = sum((i + 1) * ord(c) for i, c in enumerate(phase))
    return torch.Generator().manual_seed((seed * 1_000_003 + phase_code * 10_007 + epoch) % (2**63))


def draw_crop_flip(b: int, padding: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of `random_crop_flip` for b images: (dy, dx, flip), on the CPU."""
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    return dy, dx, flip


def apply_crop_flip(
    images: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Crop each image of the batch at offset (dy, dx) of its zero-padded copy, flipped where `flip`;
    one gather for the whole batch, on the images' device."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = dy[:, None] + torch.arange(h, device=images.device)[None, :]
    cols = dx[:, None] + torch.arange(w, device=images.device)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None]
    # padded[batch, :, rows, cols] -> (B, H, W, C)
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def random_crop_flip(images: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding plus horizontal flip, per image, for a whole batch at once.

    Same distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip on [0, 1]
    images (padding is black, before normalisation).
    """
    dy, dx, flip = draw_crop_flip(images.shape[0], padding, g)
    return apply_crop_flip(images, padding, dy.to(images.device), dx.to(images.device), flip.to(images.device))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; from pinned memory and without blocking the host on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class SplitLoader:
    """Iterates (images, labels) batches of an in-memory split, normalised, on `device`.

    The split stays on the device as uint8; a batch is gathered, cropped, flipped and normalised
    there. The epoch's order and augmentation draws are made on the CPU from (seed, phase, epoch)
    and copied to the device once per epoch, so a step never waits on the host.

    With `world_size` > 1 (DDP, dpm.distributed) a training batch of `batch_size` is the global
    batch: every rank draws the same order and augmentation and takes its own contiguous slice of
    each batch (so the ranks' shards differ, and together they are the one-device batch); an eval
    split is cut into one contiguous share per rank.
    """

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        train: bool = False,
        augment: bool = False,
        seed: int = 0,
        phase: str = "eval",
        max_steps: int = 0,
        channels_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.split, self.batch_size = split, batch_size
        self.train, self.augment = train, augment
        self.seed, self.phase, self.max_steps = seed, phase, max_steps
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        if train and batch_size < self.world_size:
            raise ValueError(f"batch size {batch_size} is smaller than the {self.world_size} ranks sharing it")
        c = split.images.shape[1]
        self.mean = torch.tensor(list(mean) or [0.0] * c, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std) or [1.0] * c, device=self.device).view(1, -1, 1, 1)
        self.epoch, self.start_step = 0, 0
        if train:
            images, labels = split.images, split.labels
        else:
            lo, hi = self._eval_share()
            images, labels = split.images[lo:hi], split.labels[lo:hi]
        # Keep the uint8 copy on the device once: no per-step host-to-device image traffic.
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)

    def _eval_share(self) -> tuple[int, int]:
        n = len(self.split)
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch to draw, and the step to start from (a resumed epoch skips the steps it ran)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        if not self.train:
            return -(-len(self.images) // self.batch_size)
        n = len(self.split)
        steps = n // self.batch_size
        if n % self.batch_size >= 2 * self.world_size:
            steps += 1  # a last batch of one image per rank would break BatchNorm in train mode: it is dropped
        return min(steps, self.max_steps) if self.max_steps else steps

    def epoch_plan(self, epoch: int) -> dict:
        """The epoch's draws on the CPU: the global order and, per step, crop/flip of the global
        batch (drawn in the order the loader has always drawn them, so results do not change)."""
        g = epoch_generator(self.seed, self.phase, epoch)
        n, steps = len(self.split), len(self)
        order = torch.randperm(n, generator=g)
        plan = {"order": order[: min(n, steps * self.batch_size)]}
        if self.augment:
            draws = [
                draw_crop_flip(len(order[s * self.batch_size : (s + 1) * self.batch_size]), 4, g) for s in range(steps)
            ]
            plan.update(
                {
                    k: torch.cat([d[i] for d in draws]) if draws else torch.zeros(0, dtype=torch.long)
                    for i, k in enumerate(("dy", "dx", "flip"))
                }
            )
        return plan

    def shard(self, step: int, global_len: int) -> tuple[int, int]:
        """This rank's [lo, hi) within step's global batch of `global_len` images."""
        start = step * self.batch_size
        return start + self.rank * global_len // self.world_size, start + (
            self.rank + 1
        ) * global_len // self.world_size

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """The image indices this rank trains on in `epoch`, in order."""
        order = self.epoch_plan(epoch)["order"]
        parts = []
        for step in range(len(self)):
            lo, hi = self.shard(step, len(order[step * self.batch_size : (step + 1) * self.batch_size]))
            parts.append(order[lo:hi])
        return torch.cat(parts) if parts else order[:0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            for step in range(len(self)):
                sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
                yield self._finish(self.images[sl].float().div_(255)), self.labels[sl]
            return
        plan = {k: _to_device(v, self.device) for k, v in self.epoch_plan(self.epoch).items()}
        order = plan["order"]
        for step in range(self.start_step, len(self)):
            lo, hi = self.shard(step, len(order[step * self.batch_size : (step + 1) * self.batch_size]))
            index = order[lo:hi]
            x = self.images[index].float().div_(255)
            if self.augment:
                x = apply_crop_flip(x, 4, plan["dy"][lo:hi], plan["dx"][lo:hi], plan["flip"][lo:hi])
            yield self._finish(x), self.labels[index]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class FolderLoader:
    """ImageNet-style streaming loader over an ImageFolder, with the same interface as SplitLoader."""

    def __init__(
        self,
        folder,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int,
        device: torch.device | str = "cpu",
        train: bool = False,
        seed: int = 0,
        phase: str = "eval",
        num_workers: int = 4,
        max_steps: int = 0,
        channels_last: bool = False,
    ):
        import torchvision.transforms as T  # deferred: only image folders need torchvision
        from torchvision.datasets import ImageFolder

        tf = (
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
            if train
            else [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
        )
        self.dataset = ImageFolder(str(folder), T.Compose(tf + [T.ToTensor(), T.Normalize(mean, std)]))
        self.batch_size, self.train, self.seed, self.phase = batch_size, train, seed, phase
        self.num_workers, self.max_steps = num_workers, max_steps
        self.device, self.channels_last, self.epoch, self.start_step = torch.device(device), channels_last, 0, 0
        # DDP: `batch_size` is the global batch; each rank reads its DistributedSampler share.
        self.world_size, self.rank = distributed.world_size(), distributed.rank()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """As SplitLoader.set_epoch. Resumed inside an epoch, the remaining images come in the same
        order; their random crops are fresh draws (the workers' streams restart)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        n = -(-len(self.dataset) // self.world_size)
        batch = max(self.batch_size // self.world_size, 1)
        steps = n // batch if self.train else -(-n // batch)
        return min(steps, self.max_steps) if self.max_steps else steps

    def indices(self) -> list[int]:
        """This rank's images of the current epoch, in order, from `start_step` on."""
        batch = max(self.batch_size // self.world_size, 1)
        if self.world_size > 1:
            sampler = torch.utils.data.DistributedSampler(
                self.dataset, self.world_size, self.rank, shuffle=self.train, seed=self.seed, drop_last=self.train
            )
            sampler.set_epoch(self.epoch)
            order = list(sampler)
        elif self.train:
            order = torch.randperm(
                len(self.dataset), generator=epoch_generator(self.seed, self.phase, self.epoch)
            ).tolist()
        else:
            order = list(range(len(self.dataset)))
        return order[self.start_step * batch :]

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=max(self.batch_size // self.world_size, 1),
            sampler=self.indices(),
            drop_last=self.train,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=epoch_generator(self.seed, self.phase, self.epoch),
            persistent_workers=False,
        )
        for step, (x, y) in enumerate(loader, start=self.start_step):
            if self.max_steps and step >= self.max_steps:
                break
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
