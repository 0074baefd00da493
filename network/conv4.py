"""Conv4: the standard few-shot backbone (4 x [conv3x3-32, BN, ReLU, maxpool 2]) + linear head."""
from __future__ import annotations

import torch
from torch import nn


def conv_block(cin: int, cout: int, batch_stats: bool) -> nn.Sequential:
    # batch_stats=True: BN always normalises with the batch's statistics and keeps no running
    # buffers (transductive, as in MAML), so the model is a pure function of its parameters.
    # Max-pooling before the ReLU: the same function and gradients as ReLU then pooling (max commutes
    # with the monotone ReLU), with the ReLU on a quarter of the values; the state-dict keys are unchanged.
    bn = nn.BatchNorm2d(cout, track_running_stats=not batch_stats)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), bn, nn.MaxPool2d(2), nn.ReLU(inplace=True))


class Conv4(nn.Module):
    """pool='flatten': the head sees the flattened 32 x s/16 x s/16 map (fixed input size);
    pool='max': global max pooling, any input size (the API-MH meta model)."""

    def __init__(self, num_classes: int, channels: int = 3, image_size: int = 32,
                 hidden: int = 32, pool: str = "flatten", batch_stats: bool = False):
        super().__init__()
        self.features = nn.Sequential(*[conv_block(channels if i == 0 else hidden, hidden, batch_stats)
                                        for i in range(4)])
        self.pool = pool
        side = image_size
        for _ in range(4):
            side //= 2
        feat = hidden * side * side if pool == "flatten" else hidden
        self.head = nn.Linear(feat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = h.flatten(1) if self.pool == "flatten" else h.amax(dim=(2, 3))
        return self.head(h)
