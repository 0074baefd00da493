"""Batched, differentiable image transforms (no Python loop over images)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; x in [0, 1], shape [B, C, H, W]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding by `pad` pixels, then random horizontal flip, per image.

    One gather does both: row/column indices are drawn per image and the flip reverses the
    column indices. Gradients flow back to `x` (the generator is trained through this).
    """
    b, _, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    flip = torch.rand(b, 1, device=dev, generator=generator) < 0.5
    rows = oy + torch.arange(h, device=dev)
    cols_fwd = torch.arange(w, device=dev).expand(b, w)
    cols = ox + torch.where(flip, cols_fwd.flip(-1), cols_fwd)
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]   # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bring images to size x size (used to feed 32x32 images to an 84x84 meta model in API-MH)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
