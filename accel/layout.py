"""Memory layouts: the same values, stored in the order the kernels run fastest in.

On the CPU oneDNN's convolutions (and their backward) prefer channels-last (NHWC) activations and
weights; a layout change between two layers costs a copy each way. A layout never changes a value,
and elementwise ops compute every element alike in either layout (bench/RESULTS.md has the timings).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NHWC = torch.channels_last


def fast_layout(obj, *, everywhere: bool = False):
    """A module or a 4-D image batch in the layout its convolutions run fastest in: channels-last on the
    CPU, and on every device with everywhere=True (the meta model: its test-time adaptation, measured
    faster so); anything else is returned unchanged."""
    if isinstance(obj, nn.Module):
        device = next((p.device for p in obj.parameters()), torch.device("cpu"))
        return obj.to(memory_format=NHWC) if everywhere or device.type == "cpu" else obj
    if obj.dim() == 4 and (everywhere or obj.device.type == "cpu"):
        return obj.contiguous(memory_format=NHWC)
    return obj


def is_nhwc(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=NHWC)


def match_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t stored channels-last when ref (a weight, an activation) is; else t unchanged."""
    return t.contiguous(memory_format=NHWC) if is_nhwc(ref) else t


def memory_order(x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(to_flat, from_flat) for images shaped like x: to_flat maps [n, *x.shape[1:]] to [n, d] in x's memory
    order (a view for x itself), from_flat maps [n, d] back to images stored as x is (a view). For a
    channels-last batch the d values of an image are read as H, W, C."""
    d = x[0].numel()
    if is_nhwc(x):
        _, c, h, w = x.shape
        return (lambda t: t.permute(0, 2, 3, 1).reshape(t.shape[0], d),
                lambda t: t.view(-1, h, w, c).permute(0, 3, 1, 2))
    shape = x.shape[1:]
    return lambda t: t.reshape(t.shape[0], d), lambda t: t.view(-1, *shape)


def affine_normalizer(mean, std, image_size: int, device, inverse: bool = False):
    """x -> (x - mean) / std per channel as one fused multiply-add, x * (1/std) + (-mean/std):
    dataset.normalize up to float rounding, one pass over the q*B perturbed images instead of two.
    inverse=True: the map back, n -> n * std + mean. On the CPU the per-channel factors are expanded to
    full channels-last planes, which vectorises best."""
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    scale, shift = (std_t, mean_t) if inverse else (1.0 / std_t, -mean_t * (1.0 / std_t))
    if torch.device(device).type == "cpu":
        plane = lambda t: t.expand(1, -1, image_size, image_size).contiguous(memory_format=NHWC)  # noqa: E731
        scale, shift = plane(scale), plane(shift)
    return lambda x: torch.addcmul(shift, x, scale)
