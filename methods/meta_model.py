"""The meta model and what it sees: its network, and images prepared for it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import accel
from core.config import Config
from dataset import MIX_IMAGE_SIZE, get_spec, normalize, resize
from dataset.specs import IMAGENET_MEAN, IMAGENET_STD
from network import build


@dataclass(frozen=True)
class MetaInput:
    """Images in [0, 1] -> the meta model's input: resized to `size`, normalised with mean/std."""
    size: int
    channels: int
    mean: tuple
    std: tuple

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        return accel.fast_layout(normalize(resize(x01, self.size), self.mean, self.std), everywhere=True)


def meta_input(cfg: Config) -> MetaInput:
    """SS/SH: the dataset's own geometry and statistics. MH: 84x84 with ImageNet statistics for every
    source (one normalisation, since replayed tasks mix classes of the three datasets)."""
    if cfg.mh:
        return MetaInput(MIX_IMAGE_SIZE, 3, IMAGENET_MEAN, IMAGENET_STD)
    s = get_spec(cfg.dataset)
    return MetaInput(s.image_size, s.channels, tuple(s.mean), tuple(s.std))


def build_meta_model(cfg: Config, prep: MetaInput, device) -> torch.nn.Module:
    """θ: a --backbone network with way_train outputs, batch-norm on batch statistics (a pure function of
    its parameters), initialised from --seed (the same on every process); MH: global max pooling."""
    torch.manual_seed(cfg.seed)
    model = build(cfg.backbone, cfg.way_train, channels=prep.channels, image_size=prep.size, batch_stats=True,
                  init=cfg.init, pool="max" if cfg.mh else "flatten").to(device)
    return accel.fast_layout(model, everywhere=True)
