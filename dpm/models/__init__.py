"""Model zoo: every network the suite prunes, built by name.

    >>> from dpm.models import build_model
    >>> model = build_model("resnet56", num_classes=10)                      # DepGraph's ResNet-56
    >>> model = build_model("resnet56", num_classes=10, shortcut="zeropad")  # option-A shortcuts

| name | what | options (default first) |
|---|---|---|
| resnet20, resnet56, resnet110 | CIFAR ResNet (He et al. 2016) | shortcut: projection, zeropad |
| vgg16 | Gate Decorator's CIFAR VGG16 | classifier: linear, mlp |
| vgg16_bn | OTOv2's CIFAR VGG16-BN | classifier: mlp, linear |
| vgg19_bn | DepGraph's CIFAR VGG-19-BN | classifier: linear, mlp |
| resnet18, resnet50, mobilenet_v2 | torchvision ImageNet nets, random init | - |
| tiny_cnn, tiny_resnet | test-sized nets (8x8 digits or 32x32) | widths / width |
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dpm.models import cifar_resnet, cifar_vgg, imagenet, tiny

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": cifar_resnet.resnet20,
    "resnet56": cifar_resnet.resnet56,
    "resnet110": cifar_resnet.resnet110,
    "vgg16": cifar_vgg.vgg16,
    "vgg16_bn": cifar_vgg.vgg16_bn,
    "vgg19_bn": cifar_vgg.vgg19_bn,
    "resnet18": imagenet.resnet18,
    "resnet50": imagenet.resnet50,
    "mobilenet_v2": imagenet.mobilenet_v2,
    "tiny_cnn": tiny.tiny_cnn,
    "tiny_resnet": cifar_resnet.tiny_resnet,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def model_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts, with their defaults (its builder's keyword-only arguments)."""
    builder = _builder(name)
    return {
        p.name: p.default
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_model(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> nn.Module:
    """Build the network ``name`` with a ``num_classes``-way head, freshly initialised.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: size of the classifier output.
        in_channels: image channels (1 for digits, 3 for CIFAR/ImageNet).
        **options: model-specific options (see :func:`model_options`), e.g. ``shortcut`` for the
            CIFAR ResNets or ``classifier`` for the VGGs.

    Raises:
        ValueError: unknown name, unknown option, bad option value, or non-positive sizes; the
            message is one line naming the bad value and the valid ones.
    """
    builder = _builder(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        accepted = ", ".join(valid) if valid else "none"
        raise ValueError(
            f"unknown option(s) {', '.join(repr(o) for o in unknown)} for model {name!r}; valid: {accepted}"
        )
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        # bool is an int subclass; True classes is a config mistake, not 1 class.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    return builder(num_classes, in_channels, **options)


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}") from None


__all__ = ["MODEL_NAMES", "build_model", "model_options"]


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's 4-d weights are in channels_last memory format (read from the first one
    whose two formats differ; a model without such a weight counts as not channels_last)."""
    for p in model.parameters():
        if p.dim() == 4:
            cl, nchw = p.is_contiguous(memory_format=torch.channels_last), p.is_contiguous()
            if cl != nchw:
                return cl
    return False


@contextlib.contextmanager
def keep_memory_format(model: nn.Module) -> Iterator[None]:
    """A channels_last model is channels_last again after the block: Torch-Pruning's removal writes
    new NCHW weights, which would drop the rest of a fast-path run to NCHW (and a resumed run, whose
    model starts channels_last, would then differ from an uninterrupted one). The parameters keep
    their identity (``Module.to`` swaps their data), so an optimizer over them stays bound."""
    channels_last = is_channels_last(model)
    yield
    if channels_last:
        model.to(memory_format=torch.channels_last)
