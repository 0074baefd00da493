"""Zero-order gradient estimation through a black box.

For each image x_i (flattened, d = C*H*W) and q directions u_ij uniform on the unit sphere:

    g_i = (d / q) * sum_j [(L(x_i + mu u_ij) - L(x_i)) / mu] * u_ij

a forward-difference estimate of the gradient of the mu-smoothed loss. It costs exactly q + 1
loss evaluations (API queries) per image: one for L(x_i), q for the perturbed copies. The q*B
perturbed images are evaluated in `numsplit` chunks of directions (memory vs. speed); all the
work is batched, with one randn call per chunk, on the images' device.
"""
from __future__ import annotations

from typing import Callable

import torch


def _chunks(q: int, numsplit: int) -> list[tuple[int, int]]:
    """Split direction indices 0..q-1 into numsplit near-equal contiguous ranges."""
    numsplit = max(1, min(int(numsplit), q))
    bounds = [round(k * q / numsplit) for k in range(numsplit + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def zo_grad(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, q: int, mu: float,
            numsplit: int, generator: torch.Generator | None = None,
            directions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate of dL/dx per image, shaped like x; L(x) per image [B]).

    loss_of: images [k*B, ...] -> per-image losses [k*B]. It is called once on x itself (k = 1) and
        then once per chunk on k perturbed copies of the batch, copy-major: image r of the call is a
        perturbation of x[r % B] (so per-image targets are `targets.repeat(k)`).
    generator: torch.Generator on x's device for the directions (None: the global RNG).
    directions: optional [q, B, *x.shape[1:]] raw Gaussian directions (normalised here); for tests
        and reproducibility: the result then depends on numsplit only through float rounding (which
        the finite differences amplify by d / (q mu): compare float64 runs for exactness).
        When drawn here, chunk c draws its directions with one randn call in the order of x's memory
        layout (a channels-last batch gets channels-last perturbations, no copy before the API).
        On the CPU, torch fills normals from the generator's stream in aligned blocks of 16, so when
        B*d is a multiple of 16 (any batch of 32x32 or 84x84 images) the same seed gives the same
        directions, hence the same estimate, for any numsplit (tested).
    """
    if q < 1 or mu <= 0:
        raise ValueError(f"zo_grad needs q >= 1 and mu > 0 (got q={q}, mu={mu})")
    x = x.detach()
    b = x.shape[0]
    d = x[0].numel()
    # Work in x's memory order: for an NCHW tensor stored channels-last, flatten as N,H,W,C.
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    to_flat = (lambda t: t.permute(0, 2, 3, 1).reshape(t.shape[0], d)) if cl else (lambda t: t.reshape(t.shape[0], d))
    shape = x.shape[1:]
    if cl:
        c, h, w = shape
        from_flat = lambda t: t.view(-1, h, w, c).permute(0, 3, 1, 2)       # noqa: E731 (no copy)
    else:
        from_flat = lambda t: t.view(-1, *shape)                            # noqa: E731
    xf = to_flat(x)                                              # [B, d] (a view for contiguous x)

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        loss0 = loss_of(x).reshape(b).to(acc)                       # L(x): B queries
        grad = torch.zeros(b, d, dtype=acc, device=x.device)
        for j0, j1 in _chunks(q, numsplit):
            n = j1 - j0
            if directions is None:
                u = torch.randn(n, b, d, device=x.device, dtype=x.dtype, generator=generator)
            else:
                u = to_flat(directions[j0:j1].reshape(n * b, *shape).to(x.device, x.dtype)).view(n, b, d)
                u = u.clone()
            inv_norm = u.norm(dim=2, keepdim=True).reciprocal_()   # u / |u| is uniform on the sphere
            xs = torch.addcmul(xf.unsqueeze(0), u, inv_norm, value=mu)    # x + mu * u_unit
            loss = loss_of(from_flat(xs.view(n * b, d))).reshape(n, b).to(acc)    # n*B queries
            del xs
            coef = (loss - loss0).div_(mu).unsqueeze(2).mul_(inv_norm).to(u.dtype)  # [(L(x+mu u)-L(x))/mu] / |u|
            grad += u.mul_(coef).sum(0)                             # sum_j coef_j * u_j, in place
            del u
        grad.mul_(d / q)
    g = from_flat(grad.to(x.dtype))
    return (g.contiguous(memory_format=torch.channels_last) if cl else g.contiguous()), loss0


def surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """mean_i <x_i, stopgrad(g_i)>: a scalar whose gradient with respect to x is grad / B, the same as
    the gradient of mean_i L(x_i) would be; backward hands the estimate on to whatever made x."""
    return (x.flatten(1) * grad.detach().flatten(1)).sum(1).mean()
