"""The original BiDf-MKD initialisation of its classifiers (Conv4 and ResNets)."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_original_(model: nn.Module) -> nn.Module:
    """Re-initialise `model` in place as the original does, and return it.

    Every Conv2d weight ~ N(0, sigma^2) with sigma = sqrt(2 / n), n = k_h * k_w * out_channels
    (fan-out He initialisation); every affine BatchNorm: weight = 1, bias = 0.
    Everything else keeps its current values, as in the original: convolution biases, Linear
    layers (PyTorch's defaults on a fresh model) and batch-norm running statistics.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.normal_(0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            m.weight.fill_(1.0)
            m.bias.fill_(0.0)
    return model
