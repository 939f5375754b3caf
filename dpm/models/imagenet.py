"""torchvision ImageNet models, always randomly initialised (``weights=None``: nothing is downloaded).

They are the ImageNet architectures unchanged (7x7 stride-2 stem and max-pool for the ResNets,
stride-2 stem for MobileNetV2): on 32x32 inputs they run, with a 1x1 map at the end, but they are
not CIFAR-adapted variants. ``in_channels`` other than 3 replaces only the stem convolution.
"""

from __future__ import annotations

from torch import nn


def _tvm():
    from torchvision import models  # deferred: it imports torch._dynamo (about 1 s); only these builders use it

    return models


def _replace_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18, random init."""
    model = _tvm().resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _replace_stem(model.conv1, in_channels)
    return model


def resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-50, random init."""
    model = _tvm().resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _replace_stem(model.conv1, in_channels)
    return model


def mobilenet_v2(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision MobileNetV2, random init."""
    model = _tvm().mobilenet_v2(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.features[0][0] = _replace_stem(model.features[0][0], in_channels)
    return model
