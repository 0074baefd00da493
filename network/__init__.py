"""Networks and the one registry that builds them by name."""
from __future__ import annotations

from torch import nn

from .conv4 import Conv4
from .generator import LATENT_DIM, Generator
from . import original
from .initialise import init_original_
from .resnet import LAYOUTS as RESNET_LAYOUTS
from .resnet import ResNet, resnet

ARCHS = ("conv4", "resnet10", "resnet18", "resnet34", "resnet50", "resnet101")
INITS = ("original", "torch")


def build(name: str, num_classes: int = 5, *, channels: int = 3, image_size: int = 32,
          batch_stats: bool = False, pool: str = "flatten", nz: int = LATENT_DIM, stem_relu: bool = False,
          init: str = "original") -> nn.Module:
    """Build a network by name.

    name: conv4 | resnet10 | resnet18 | resnet34 | resnet50 | resnet101 (classifiers) or generator.
    batch_stats: batch-norm with batch statistics only (the meta model: pure function of its
        parameters, works with torch.func.functional_call); False for APIs (running statistics).
    pool: conv4 head, 'flatten' (fixed image_size) or 'max' (global max pooling, any size).
    stem_relu: ResNets only, a ReLU after the stem's batch-norm (the original has none).
    init: classifiers only. 'original': the original's initialisation (init_original_);
        'torch': PyTorch's default initialisation. The generator has its own (Generator.reset).
    Raises ValueError for an unknown name, pool or init.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if name == "generator":
        return Generator(nz, image_size, channels)
    if name == "conv4":
        if pool not in ("flatten", "max"):
            raise ValueError(f"unknown conv4 pool {pool!r}; choose flatten or max")
        model = Conv4(num_classes, channels, image_size, pool=pool, batch_stats=batch_stats)
    elif name in RESNET_LAYOUTS:
        model = resnet(name, num_classes, channels, batch_stats, stem_relu=stem_relu)
    else:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)} or generator")
    if init == "original":
        init_original_(model)
    return model
