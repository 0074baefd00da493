"""The image generator inverted against an API (docs/method.md)."""
from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    """z in R^nz -> Linear -> (128, s/4, s/4) -> BN -> up x2 -> conv3x3 128 -> BN -> LeakyReLU(0.2)
    -> up x2 -> conv3x3 64 -> BN -> LeakyReLU(0.2) -> conv3x3 C -> sigmoid: images in [0, 1]."""

    def __init__(self, nz: int = 256, image_size: int = 32, channels: int = 3, ngf: int = 64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"generator image_size must be a multiple of 4, got {image_size}")
        self.init_side = image_size // 4
        self.fc = nn.Linear(nz, 2 * ngf * self.init_side ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, channels, 3, padding=1),
            nn.Sigmoid(),
        )
        self.reset()

    def reset(self) -> None:
        """Fresh weights for every synthesis: conv/linear ~ N(0, 0.02), BN weight ~ N(1, 0.02)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], -1, self.init_side, self.init_side)
        return self.body(h)
