"""Networks and the one registry that builds them by name."""
from __future__ import annotations

from torch import nn

from .conv4 import Conv4
from .generator import Generator
from .resnet import ResNet, resnet10, resnet18

ARCHS = ("conv4", "resnet10", "resnet18")


def build(name: str, num_classes: int = 5, *, channels: int = 3, image_size: int = 32,
          batch_stats: bool = False, pool: str = "flatten", nz: int = 256) -> nn.Module:
    """Build a network by name.

    name: conv4 | resnet10 | resnet18 (classifiers) or generator.
    batch_stats: batch-norm with batch statistics only (the meta model: pure function of its
        parameters, works with torch.func.functional_call); False for APIs (running statistics).
    pool: conv4 head, 'flatten' (fixed image_size) or 'max' (global max pooling, any size).
    """
    if name == "conv4":
        return Conv4(num_classes, channels, image_size, pool=pool, batch_stats=batch_stats)
    if name == "resnet10":
        return resnet10(num_classes, channels, batch_stats)
    if name == "resnet18":
        return resnet18(num_classes, channels, batch_stats)
    if name == "generator":
        return Generator(nz, image_size, channels)
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
