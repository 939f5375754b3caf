"""CIFAR ResNets (He et al. 2016, section 4.2) and the small residual net used by fast tests.

Layout: a 3x3 stem conv, then stages of basic blocks (3x3 conv-BN-ReLU, 3x3 conv-BN, residual add,
ReLU), global average pooling and one Linear. ResNet-20/56/110 have three stages of 16/32/64
channels with n = 3/9/18 blocks each.

Shortcuts on the blocks that change shape:
- ``"projection"`` (option B): 1x1 conv + BN. This is DepGraph/Torch-Pruning's ResNet-56 (and Gate
  Decorator's default), 855,770 parameters for 10 classes.
- ``"zeropad"`` (option A): subsample with stride and zero-pad the new channels; no parameters.
  This is the original paper's CIFAR net (853,018 parameters for ResNet-56). Torch-Pruning can
  build its dependency graph, but pruning the residual-stream channels is not supported (the
  fixed zero block cannot follow them); the shortcut raises a clear error if that is attempted.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("projection", "zeropad")


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel and zero-pad the missing channels.

    Written as a strided slice plus ``F.pad`` (not a Python lambda) so the model deep-copies and
    pickles, and so Torch-Pruning's autograd-based tracer sees ordinary slice/pad nodes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            # Channel pruning (Torch-Pruning treats the pad as element-wise) cannot keep the fixed
            # zero block aligned with the residual stream; fail here, not as a far-away matmul error.
            raise RuntimeError(
                f"zero-padding shortcut expects {self.in_channels} input channels, got {x.shape[1]}: "
                "residual channels of shortcut='zeropad' models cannot be pruned; use shortcut='projection'"
            )
        x = x[:, :, :: self.stride, :: self.stride]
        missing = self.out_channels - self.in_channels
        # The paper pads symmetrically (planes//4 on each side for a 2x widening).
        return F.pad(x, (0, 0, 0, 0, missing // 2, missing - missing // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual add; ``downsample`` is None for identity shortcuts."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str = "projection") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            if shortcut == "projection":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(channels),
                )
            else:
                self.downsample = ZeroPadShortcut(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Functional ReLU after the add, as in DepGraph's CIFAR ResNet: Torch-Pruning's native
        # counter counts ReLU *modules* only, and this is what makes ResNet-56 read 127.12 M there.
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """Stem conv, stages of :class:`BasicBlock`, global average pool, Linear.

    The first stage keeps the resolution; every later stage halves it with its first block.
    Adaptive pooling (not AvgPool2d(8)) lets the same class run on 8x8 digits and 32x32 CIFAR.
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        shortcut: str = "projection",
    ) -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid: {', '.join(SHORTCUTS)}")
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks {tuple(blocks)} and widths {tuple(widths)} must be non-empty and of equal length")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        channels = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*layers))
        # Named layer1..layerN like torchvision and Torch-Pruning, so checkpoints and
        # ignored-layer configs written for those read naturally here.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self.num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        x = self.avgpool(x)
        # view, not flatten: OTOv2's ONNX graph builder does not know Flatten (it exports Reshape
        # for view), and the map is 1x1 here so view is always legal.
        return self.fc(x.view(x.size(0), -1))


def _init_weights(model: nn.Module) -> None:
    # He initialisation as in the CIFAR ResNet paper and Torch-Pruning's model zoo.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _cifar_resnet(depth: int, num_classes: int, in_channels: int, shortcut: str) -> CifarResNet:
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), (16, 32, 64), num_classes, in_channels, shortcut)


def resnet20(num_classes: int, in_channels: int = 3, *, shortcut: str = "projection") -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage)."""
    return _cifar_resnet(20, num_classes, in_channels, shortcut)


def resnet56(num_classes: int, in_channels: int = 3, *, shortcut: str = "projection") -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage); with ``projection`` it is DepGraph's ResNet-56."""
    return _cifar_resnet(56, num_classes, in_channels, shortcut)


def resnet110(num_classes: int, in_channels: int = 3, *, shortcut: str = "projection") -> CifarResNet:
    """CIFAR ResNet-110 (18 blocks per stage)."""
    return _cifar_resnet(110, num_classes, in_channels, shortcut)


def tiny_resnet(num_classes: int, in_channels: int = 3, *, width: int = 8) -> CifarResNet:
    """Test-sized residual net: stem, one identity block, one downsampling block with projection.

    Channels ``width`` then ``2 * width``; works on 8x8 digits as well as 32x32 inputs.
    """
    return CifarResNet((1, 1), (width, 2 * width), num_classes, in_channels, "projection")
