"""Batched, differentiable image transforms (no Python loop over images)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; x in [0, 1], shape [B, C, H, W]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def random_crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None,
                     per: str = "image", size: int | None = None) -> torch.Tensor:
    """Random crop (size x size, default the image's own) after zero padding by `pad` pixels, then random
    horizontal flip.

    per="image": an offset and a coin flip drawn for each image; one gather does both (row/column
    indices per image, the flip reverses the column indices).
    per="batch": one offset and one coin for the whole batch, as torchvision's RandomCrop and
    RandomHorizontalFlip do on a batched tensor; two index_selects, no host sync.
    Gradients flow back to `x` (the generator is trained through this).
    """
    if per not in ("image", "batch"):
        raise ValueError(f"random_crop_flip: per must be 'image' or 'batch', got {per!r}")
    b, _, full_h, full_w = x.shape
    h, w = (size, size) if size else (full_h, full_w)
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    k = b if per == "image" else 1
    oy = torch.randint(0, full_h + 2 * pad - h + 1, (k, 1), device=dev, generator=generator)
    ox = torch.randint(0, full_w + 2 * pad - w + 1, (k, 1), device=dev, generator=generator)
    flip = torch.rand(k, 1, device=dev, generator=generator) < 0.5
    rows = oy + torch.arange(h, device=dev)
    cols_fwd = torch.arange(w, device=dev).expand(k, w)
    cols = ox + torch.where(flip, cols_fwd.flip(-1), cols_fwd)
    if per == "batch":
        return xp.index_select(2, rows[0]).index_select(3, cols[0])
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]   # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bring images to size x size (used to feed 32x32 images to an 84x84 meta model in API-MH)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
