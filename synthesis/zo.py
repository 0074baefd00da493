"""Zero-order gradient estimation through a black box.

For each image x_i (flattened, d = C*H*W) and q directions u_ij uniform on the unit sphere:

    g_i = (d / q) * sum_j [(L(x_i + mu u_ij) - L(x_i)) / mu] * u_ij

a forward-difference estimate of the gradient of the mu-smoothed loss. It costs exactly q + 1
loss evaluations (API queries) per image: one for L(x_i), q for the perturbed copies. The q*B
perturbed images are evaluated in `numsplit` chunks of directions (memory vs. speed); all the
work is batched, on the images' device.

On the CPU each chunk runs as LANES blocks of directions, and with 2 or more torch threads the
blocks run concurrently, each in a thread of its own (a "lane") with its share of the threads:
two single-threaded pipelines keep both cores of a small CPU busy through the small ops (pooling,
ReLU, the direction draws) that one two-threaded pipeline leaves half idle. Each direction is
drawn from its own seed and the blocks' sums are added in block order, so the estimate does not
depend on the lanes, the thread count or numsplit.
"""
from __future__ import annotations

from typing import Callable

import torch

from core.lanes import lane_pool, results_in_order

LANES = 2       # CPU: blocks per chunk of directions, run concurrently when there are threads for them


def _chunks(q: int, numsplit: int) -> list[tuple[int, int]]:
    """Split direction indices 0..q-1 into numsplit near-equal contiguous ranges."""
    numsplit = max(1, min(int(numsplit), q))
    bounds = [round(k * q / numsplit) for k in range(numsplit + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def zo_grad(loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, q: int, mu: float,
            numsplit: int, generator: torch.Generator | None = None,
            directions: torch.Tensor | None = None, lanes: int = LANES,
            concurrent: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate of dL/dx per image, shaped like x; L(x) per image [B]).

    loss_of: images [k*B, ...] -> per-image losses [k*B]. It is called once on x itself (k = 1) and
        then once per block of directions on k perturbed copies of the batch, copy-major: image r of
        the call is a perturbation of x[r % B] (so per-image targets are `targets.repeat(k)`). On the
        CPU with concurrent=True and 2+ torch threads, `lanes` block calls may run at once, each in a
        thread of its own: pass concurrent=False when loss_of is not thread-safe.
    generator: torch.Generator on x's device for the directions (None: the global RNG).
    directions: optional [q, B, *x.shape[1:]] raw Gaussian directions (normalised here); for tests
        and reproducibility: the result then depends on numsplit only through float rounding (which
        the finite differences amplify by d / (q mu): compare float64 runs for exactness).
        When drawn here, directions follow x's memory layout (a channels-last batch gets channels-last
        perturbations, no copy before the API). On the CPU, direction j comes from its own seed (q
        seeds drawn from `generator` per call), so the same seed gives the same estimate for any
        numsplit and any thread count (tested); elsewhere, one draw per chunk.
    lanes: on the CPU, blocks per chunk (1: each chunk in one piece, one after another, as the
        original's loop; bench/zo_step.py --plain_api).
    """
    if q < 1 or mu <= 0:
        raise ValueError(f"zo_grad needs q >= 1 and mu > 0 (got q={q}, mu={mu})")
    x = x.detach()
    b = x.shape[0]
    d = x[0].numel()
    cpu = x.device.type == "cpu"
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

    chunks = _chunks(q, numsplit)
    lanes = max(1, lanes) if cpu else 1
    blocks = [(a + i, a + k) for a, z in chunks for i, k in _chunks(z - a, lanes)]
    seeds = None
    if cpu and directions is None:
        seeds = torch.randint(0, 2 ** 62, (q,), generator=generator).tolist()

    def draw(j0: int, j1: int) -> torch.Tensor:
        """Raw directions j0..j1-1, [n, B, d] in x's memory order (read only)."""
        n = j1 - j0
        if directions is not None:
            return to_flat(directions[j0:j1].reshape(n * b, *shape).to(x.device, x.dtype)).view(n, b, d)
        if seeds is None:
            return torch.randn(n, b, d, device=x.device, dtype=x.dtype, generator=generator)
        u = torch.empty(n, b, d, dtype=x.dtype)
        for k in range(n):
            u[k].normal_(generator=torch.Generator().manual_seed(seeds[j0 + k]))
        return u

    def block_sum(j0: int, j1: int, loss0: torch.Tensor) -> torch.Tensor:
        """sum_j [(L(x + mu u_j) - L(x)) / mu] u_j / |u_j| over directions j0..j1-1: [B, d]."""
        with torch.no_grad():
            n = j1 - j0
            u = draw(j0, j1)
            inv_norm = u.norm(dim=2, keepdim=True).reciprocal_()   # u / |u| is uniform on the sphere
            xs = torch.addcmul(xf.unsqueeze(0), u, inv_norm, value=mu)    # x + mu * u_unit
            loss = loss_of(from_flat(xs.view(n * b, d))).reshape(n, b).to(acc)    # n*B queries
            del xs
            coef = (loss - loss0).div_(mu).mul_(inv_norm.squeeze(2)).to(u.dtype)   # [n, B]
            return torch.bmm(coef.t().unsqueeze(1), u.transpose(0, 1)).squeeze(1)  # per image: coef · u

    with torch.no_grad():
        loss0 = loss_of(x).reshape(b).to(acc)                       # L(x): B queries
        grad = torch.zeros(b, d, dtype=acc, device=x.device)
        threads = torch.get_num_threads()
        if concurrent and lanes >= 2 and threads >= 2 and len(blocks) >= 2:
            pool = lane_pool(lanes, max(1, threads // lanes))
            for s in results_in_order(pool.submit(block_sum, j0, j1, loss0) for j0, j1 in blocks):
                grad += s                                           # added in block order, as below
        else:
            for j0, j1 in blocks:
                grad += block_sum(j0, j1, loss0)
        grad.mul_(d / q)
    g = from_flat(grad.to(x.dtype))
    return (g.contiguous(memory_format=torch.channels_last) if cl else g.contiguous()), loss0


def surrogate(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """mean_i <x_i, stopgrad(g_i)>: a scalar whose gradient with respect to x is grad / B, the same as
    the gradient of mean_i L(x_i) would be; backward hands the estimate on to whatever made x."""
    return (x.flatten(1) * grad.detach().flatten(1)).sum(1).mean()
