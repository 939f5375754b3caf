"""CIFAR VGGs, each exactly as the base method that reports on it defines it (docs/method.md section 9).

The two VGG-16 tables of the paper use different networks, and Params % only matches the paper with
each base's own model:

- ``vgg16`` -- Gate Decorator's VGG16: conv(bias)-BN-ReLU x13 with 5 max-pools, a no-op
  AvgPool2d(1, 1), one Linear(512, classes). 14,728,266 parameters for 10 classes.
- ``vgg16_bn`` -- OTOv2's VGG16-BN: the same 13 conv(bias)-BN-ReLU layers and 5 max-pools, then
  AdaptiveAvgPool2d(1) and a 512-512-512-classes classifier (Linear, ReLU, Dropout(0.5), Linear,
  ReLU, Dropout(0.5), Linear). 15,253,578 parameters for 10 classes (the MLP adds
  2 * (512 * 512 + 512) = 525,312 over ``vgg16``).
- ``vgg19_bn`` -- DepGraph/Torch-Pruning's CIFAR VGG-19 (the RepDistiller layout): 16
  conv(bias)-BN-ReLU layers, max-pools after the first four blocks, AdaptiveAvgPool2d(1) after the
  fifth, one Linear(512, classes). 20,086,692 parameters for 100 classes.

Every VGG takes ``classifier="linear" | "mlp"`` to swap the head; the defaults are the ones above.
All of them expect 32x32 inputs (the feature map must be 1x1 before the classifier).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

# "M" is a 2x2 max-pool; integers are 3x3 conv-BN-ReLU output widths.
# The layer widths as the papers print them (kept on a few lines by hand, not by the formatter).
# fmt: off
CFG16: tuple[Union[int, str], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                      512, 512, 512, "M", 512, 512, 512, "M")
# Torch-Pruning's VGG-19 average-pools the last block instead of max-pooling it.
CFG19: tuple[Union[int, str], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                      512, 512, 512, 512, "M", 512, 512, 512, 512)
# fmt: on
CLASSIFIERS = ("linear", "mlp")


class CifarVGG(nn.Module):
    """``features`` (conv stack + final pool), flatten, ``classifier``."""

    def __init__(
        self,
        cfg: Sequence[Union[int, str]],
        num_classes: int,
        in_channels: int = 3,
        classifier: str = "linear",
        final_pool: str = "adaptive",
    ) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}; valid: {', '.join(CLASSIFIERS)}")
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # bias=True on every conv: all three source models have it, and it is part of the
                # pinned parameter counts (OTOv2 even puts the bias into its zero-invariant groups).
                layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                channels = int(v)
        # Gate Decorator ends its features with a no-op AvgPool2d(1, 1); kept because thop's
        # default rules (its native counter) count it.
        layers.append(nn.AvgPool2d(kernel_size=1, stride=1) if final_pool == "identity" else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        if classifier == "linear":
            self.classifier: nn.Module = nn.Linear(channels, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(channels, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(p=0.5),
                nn.Linear(512, 512),
                nn.ReLU(inplace=True),
                nn.Dropout(p=0.5),
                nn.Linear(512, num_classes),
            )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # view, not flatten: OTOv2's ONNX graph builder does not know Flatten but handles the
        # Reshape that view exports to.
        return self.classifier(x.view(x.size(0), -1))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def vgg16(num_classes: int, in_channels: int = 3, *, classifier: str = "linear") -> CifarVGG:
    """Gate Decorator's CIFAR VGG16 (single Linear head); 14,728,266 parameters for 10 classes."""
    return CifarVGG(CFG16, num_classes, in_channels, classifier, final_pool="identity")


def vgg16_bn(num_classes: int, in_channels: int = 3, *, classifier: str = "mlp") -> CifarVGG:
    """OTOv2's CIFAR VGG16-BN (512-512-512 head); 15,253,578 parameters for 10 classes."""
    return CifarVGG(CFG16, num_classes, in_channels, classifier, final_pool="adaptive")


def vgg19_bn(num_classes: int, in_channels: int = 3, *, classifier: str = "linear") -> CifarVGG:
    """DepGraph/Torch-Pruning's CIFAR VGG-19 with BN (single Linear head)."""
    return CifarVGG(CFG19, num_classes, in_channels, classifier, final_pool="adaptive")
