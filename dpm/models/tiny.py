"""Test-sized CNN: three conv-BN-ReLU layers, global average pool, Linear.

Runs on 8x8 single-channel digits (``in_channels=1``) and 32x32 RGB alike. Its residual sibling,
``tiny_resnet``, lives with the other residual nets in :mod:`dpm.models.cifar_resnet`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TinyCNN(nn.Module):
    """conv-BN-ReLU per width (the second one with stride 2), adaptive average pool, Linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths: Sequence[int] = (16, 32, 32)) -> None:
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i, w in enumerate(widths):
            # One downsampling step keeps an 8x8 input at 4x4: enough spatial extent left for the
            # 3x3 convs to matter while staying cheap.
            stride = 2 if i == 1 else 1
            layers += [
                nn.Conv2d(channels, int(w), 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(int(w)),
                nn.ReLU(inplace=True),
            ]
            channels = int(w)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.fc(x.view(x.size(0), -1))


def tiny_cnn(num_classes: int, in_channels: int = 3, *, widths: Sequence[int] = (16, 32, 32)) -> TinyCNN:
    """Three conv-BN-ReLU layers (default widths 16/32/32), for fast tests."""
    return TinyCNN(num_classes, in_channels, tuple(widths))
