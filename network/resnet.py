"""ResNet-10/18/34/50/101 for small images, laid out as the original BiDf-MKD ResNets.

Stem: conv3x3-64 (stride 1, no bias) + BN, no max-pool; ReLU after the stem only with
stem_relu=True (the original has none). Four stages; the first block of stages 2-4 halves the
resolution. Head: global average pooling + linear.

    basic block (10/18/34), widths 64-128-256-512:
        y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + P(x))
        P = conv1x1_s + BN when the width changes, else identity
    bottleneck block (50/101), widths 256-512-1024-2048, inner width w/4:
        y = relu(BN(conv1x1(relu(BN(conv3x3_s(relu(BN(conv1x1(x))))))) + P(x))
        the 3x3 convolution has a bias; P = a bare conv1x1_s (no BN) when the width changes
"""
from __future__ import annotations

import torch
from torch import nn

BASIC_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)

# name -> (block kind, blocks per stage)
LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


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


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, batch_stats: bool):
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = _bn(mid, batch_stats)
        # The original gives only this convolution a bias (redundant before BN, kept for loading).
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=True)
        self.bn2 = _bn(mid, batch_stats)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = _bn(cout, batch_stats)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """block: 'basic' | 'bottleneck'; blocks_per_stage: four counts; widths: the stages' output widths
    (default 64-128-256-512 for basic blocks, 256-512-1024-2048 for bottlenecks)."""

    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int, channels: int = 3,
                 batch_stats: bool = False, *, block: str = "basic", widths: tuple[int, ...] | None = None,
                 stem_relu: bool = False):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"unknown ResNet block {block!r}; choose basic or bottleneck")
        if len(blocks_per_stage) != 4:
            raise ValueError(f"a ResNet has four stages, got {len(blocks_per_stage)} block counts")
        widths = widths or (BASIC_WIDTHS if block == "basic" else BOTTLENECK_WIDTHS)
        unit = BasicBlock if block == "basic" else Bottleneck
        stem = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), _bn(64, batch_stats)]
        if stem_relu:
            stem.append(nn.ReLU(inplace=True))
        self.stem = nn.Sequential(*stem)
        layers, cin = [], 64
        for stage, (width, n) in enumerate(zip(widths, blocks_per_stage)):
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(unit(cin, width, stride, batch_stats))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def resnet(name: str, num_classes: int, channels: int = 3, batch_stats: bool = False, *,
           stem_relu: bool = False) -> ResNet:
    """One of LAYOUTS by name."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(LAYOUTS)}")
    block, counts = LAYOUTS[name]
    return ResNet(counts, num_classes, channels, batch_stats, block=block, stem_relu=stem_relu)
