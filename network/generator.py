"""The image generator inverted against an API (docs/method.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import accel

LATENT_DIM = 256    # nz: the size of a latent code z

# Rows: the 4 taps of the transposed convolution; columns: the 3 taps of the 3x3 kernel (UpConv3x3).
_PHASE_TAPS = ((0., 0., 1.), (0., 1., 1.), (1., 1., 0.), (1., 0., 0.))


class UpConv3x3(nn.Conv2d):
    """Nearest x2 upsampling followed by a 3x3 convolution (padding 1), as one stride-2 transposed
    convolution on the small input. Same parameters and outputs (to float rounding) as
    nn.Upsample(scale_factor=2) + nn.Conv2d(cin, cout, 3, padding=1), in 4/9 of the multiply-adds.

    Output pixel 2m+a (per axis) sees input rows m-1, m (a = 0) or m, m+1 (a = 1) with the weight rows
    summed as (W0, W1+W2) or (W0+W1, W2). A transposed convolution with stride 2, padding 1 and the
    4-tap kernel T = (W2, W1+W2, W0+W1, W0) computes exactly that: out[2m+a] = sum_i x[i] T[2m+a+1-2i].
    """

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__(cin, cout, 3, padding=1, bias=bias)
        # made once, moved and cast with the module; not part of its state
        self.register_buffer("taps", torch.tensor(_PHASE_TAPS), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = torch.einsum("ti,ocij,sj->cots", self.taps, self.weight, self.taps)   # [cin, cout, 4, 4]
        kernel = accel.match_layout(kernel, self.weight)    # the module's layout: no conversion at every call
        return F.conv_transpose2d(x, kernel, self.bias, stride=2, padding=1)


class Generator(nn.Module):
    """z in R^nz -> Linear -> (128, s/4, s/4) -> BN -> up x2 -> conv3x3 128 -> BN -> LeakyReLU(0.2)
    -> up x2 -> conv3x3 64 -> BN -> LeakyReLU(0.2) -> conv3x3 C -> sigmoid: images in [0, 1].
    Each "up x2 -> conv3x3" runs as one UpConv3x3."""

    def __init__(self, nz: int = LATENT_DIM, image_size: int = 32, channels: int = 3, ngf: int = 64):
        super().__init__()
        self.nz = nz
        if image_size % 4:
            raise ValueError(f"generator image_size must be a multiple of 4, got {image_size}")
        self.init_side = image_size // 4
        self.fc = nn.Linear(nz, 2 * ngf * self.init_side ** 2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            UpConv3x3(2 * ngf, 2 * ngf, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            UpConv3x3(2 * ngf, ngf, bias=False),
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
        # in the layout of the convolutions that follow: a change between two layers costs a copy each way
        return self.body(accel.match_layout(h, self.body[1].weight))
