"""ResNet-10/18 for small images: 3x3 stem without downsampling, basic blocks 64-128-256-512,
global average pooling. Used as API architectures."""
from __future__ import annotations

import torch
from torch import nn


def _bn(c: int, batch_stats: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=not batch_stats)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, batch_stats: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout, batch_stats)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout, batch_stats)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout, batch_stats))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int, channels: int = 3,
                 batch_stats: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _bn(64, batch_stats),
                                  nn.ReLU(inplace=True))
        layers, cin = [], 64
        for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, width, stride, batch_stats))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def resnet10(num_classes: int, channels: int = 3, batch_stats: bool = False) -> ResNet:
    return ResNet((1, 1, 1, 1), num_classes, channels, batch_stats)


def resnet18(num_classes: int, channels: int = 3, batch_stats: bool = False) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, channels, batch_stats)
