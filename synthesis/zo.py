"""Zero-order gradient estimation through a black box (docs/method.md).

For each image x_i (flattened, d = C*H*W) and directions u_ij uniform on the unit sphere, two estimators
(`--zo_estimator`):

    forward (the original's), q directions:
        g_i = (d / q) * sum_{j<q} [(L(x_i + mu u_ij) - L(x_i)) / mu] * u_ij

    central (antithetic pairs), m = q / 2 directions:
        g_i = (d / m) * sum_{j<m} [(L(x_i + mu u_ij) - L(x_i - mu u_ij)) / (2 mu)] * u_ij

Both are unbiased for the gradient of the mu-smoothed loss E_v L(x + mu v) (v uniform in the unit ball),
as (d / mu) E_u[L(x + mu u) u] is that gradient; -u being distributed as u, the central pair's expectation is
twice one term's: hence 1 / (2 mu) and d / m. Both cost exactly q + 1 queries per image: L(x_i) (the loss
recover reports and keeps) and q perturbed copies. Central cancels the second-order term (mu / 2) u^T H u
at the price of half the directions (experiments/fidelity.py measures which wins on the demo APIs).

Low-dimensional directions (`--zo_resolution R`, an addition to the paper): u is drawn at R x R per channel
and upsampled (nearest) to the image's H x W, so it lies in the d' = C*R*R-dimensional subspace of images
constant on (H/R) x (W/R) blocks; d' takes d's place in both factors, and the estimate is unbiased for the
projection P grad of the smoothed gradient onto that subspace. With q directions its cosine to P grad is about
sqrt(q / (q + d')) instead of sqrt(q / (q + d)): the same queries see far more of a smaller space.

Direction j is drawn from its own seed (q seeds per step from the caller's generator, for either
estimator), so which directions a step uses depends on that generator alone: not on `numsplit` (the
perturbed images are queried in numsplit chunks of directions, a memory knob), the threads or how the
chunks are run (accel.sum_in_order).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import accel

ESTIMATORS = ("forward", "central")     # core/config.py's zo_estimator


def zo_grad(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, q: int, mu: float,
            numsplit: int, generator: torch.Generator | None = None,
            directions: torch.Tensor | None = None, concurrent: bool = True,
            estimator: str = "forward", resolution: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate of dL/dx per image, shaped and stored like x; L(x) per image [B]).

    loss_of: images [k*B, ...] -> per-image losses [k*B]. Called once on x itself (k = 1), then once per
        block of directions on k perturbed copies of the batch, copy-major: image r of the call is a
        perturbation of x[r % B] (so per-image targets are `targets.repeat(k)`). Blocks may run at once
        in CPU threads: pass concurrent=False when loss_of is not thread-safe.
    generator: torch.Generator on x's device the q seeds of the directions come from (None: the global RNG).
    directions: optional [q, B, *x.shape[1:]] raw Gaussian directions (normalised here), for tests; the
        result then depends on numsplit through float rounding only (which the finite differences
        amplify by d / (q mu): compare float64 runs for exactness).
    estimator: "forward" (q directions) or "central" (the first q / 2 directions, each queried at x + mu u
        and x - mu u; q must be even): see the module's docstring.
    resolution: R > 0 draws each direction at R x R per channel and upsamples it (H and W multiples of R);
        0: full resolution (the original).
    The directions are drawn in x's memory order (accel.memory_order): no copy of the q*B images before
    the API. Sums over directions are added in block order, whichever block ran first.
    """
    if q < 1 or mu <= 0:
        raise ValueError(f"zo_grad needs q >= 1 and mu > 0 (got q={q}, mu={mu})")
    if estimator not in ESTIMATORS:
        raise ValueError(f"zo_grad's estimator is one of {', '.join(ESTIMATORS)}, not {estimator!r}")
    if estimator == "central" and q % 2:
        raise ValueError(f"central differences query q / 2 pairs: q must be even (got q={q})")
    m = q if estimator == "forward" else q // 2                        # directions
    x = x.detach()
    b, d = x.shape[0], x[0].numel()
    c, h, w = x.shape[1:]
    if resolution and directions is not None:
        raise ValueError("zo_grad takes given directions at full resolution only (resolution 0)")
    if resolution and (h % resolution or w % resolution):
        raise ValueError(f"zo_resolution {resolution} must divide the image's size {h}x{w}")
    dims = c * resolution * resolution if resolution else d            # the space the directions span
    to_flat, from_flat = accel.memory_order(x)
    xf = to_flat(x)                                                     # [B, d], a view
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    seeds = None
    if directions is None:
        seeds = torch.randint(0, 2 ** 62, (q,), generator=generator, device=x.device).tolist()

    def draw(j0: int, j1: int) -> torch.Tensor:
        """Raw directions j0..j1-1, [n, B, d] in x's memory order."""
        if directions is not None:
            return to_flat(directions[j0:j1].reshape((j1 - j0) * b, *x.shape[1:]).to(x.device, x.dtype)).view(-1, b, d)
        u = torch.empty(j1 - j0, b, dims, dtype=x.dtype, device=x.device)
        g = torch.Generator(device=x.device)
        for k in range(j1 - j0):
            u[k].normal_(generator=g.manual_seed(seeds[j0 + k]))
        if not resolution:
            return u
        up = F.interpolate(u.view(-1, c, resolution, resolution), size=(h, w), mode="nearest")
        return to_flat(up).view(j1 - j0, b, d)

    def block_sum(j0: int, j1: int) -> torch.Tensor:
        """sum_j [finite difference along u_j] u_j / |u_j| over directions j0..j1-1: [B, d]."""
        with torch.no_grad():
            n = j1 - j0
            u = draw(j0, j1)
            inv_norm = u.norm(dim=2, keepdim=True).reciprocal_()           # u / |u| is uniform on the sphere
            if estimator == "forward":
                xs = torch.addcmul(xf.unsqueeze(0), u, inv_norm, value=mu)  # x + mu * u_unit
                diff = (loss_of(from_flat(xs.view(n * b, d))).reshape(n, b).to(acc) - loss0).div_(mu)  # n*B queries
            else:       # one call of 2n copies, copy-major: x + mu u_unit, then x - mu u_unit
                xs = torch.cat([torch.addcmul(xf.unsqueeze(0), u, inv_norm, value=v) for v in (mu, -mu)])
                loss = loss_of(from_flat(xs.view(2 * n * b, d))).reshape(2, n, b).to(acc)       # 2n*B queries
                diff = (loss[0] - loss[1]).div_(2 * mu)
            del xs
            coef = diff.mul_(inv_norm.squeeze(2)).to(u.dtype)                                  # [n, B]
            return torch.bmm(coef.t().unsqueeze(1), u.transpose(0, 1)).squeeze(1)  # per image: coef · u

    with torch.no_grad():
        loss0 = loss_of(x).reshape(b).to(acc)                           # L(x): B queries
        grad = torch.zeros(b, d, dtype=acc, device=x.device)
        accel.sum_in_order(block_sum, accel.direction_blocks(m, numsplit, x.device), grad, concurrent)
        grad.mul_(dims / m)                                             # m = q for forward: d / q as before
    return from_flat(grad.to(x.dtype)), loss0


def surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """mean_i <x_i, stopgrad(g_i)>: a scalar whose gradient with respect to x is grad / B, the same as
    the gradient of mean_i L(x_i) would be; backward hands the estimate on to whatever made x."""
    return (x.flatten(1) * grad.detach().flatten(1)).sum(1).mean()
