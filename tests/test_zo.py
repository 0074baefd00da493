"""synthesis/zo.py: the zero-order estimate agrees with the true gradient of a known function, costs exactly
q + 1 queries per image, and its directions depend on the generator alone (not on numsplit, threads, the
memory layout or how the blocks run); the surrogate hands the estimate on to autograd. The same for
--zo_estimator central (q/2 antithetic pairs), and where it is closer to the gradient than forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import accel
from synthesis.zo import surrogate, zo_grad

from helpers import random_api

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow


def cosine(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def smooth_loss(x):
    """Per-image logistic + quadratic loss with a known autograd gradient."""
    f = x.flatten(1)
    w = torch.linspace(-1, 1, f.shape[1], dtype=f.dtype, device=f.device)
    return F.softplus(-(f * w).sum(1)) + 0.3 * (f ** 2).sum(1)


def true_grad(x):
    x = x.clone().requires_grad_()
    smooth_loss(x).sum().backward()
    return x.grad


def gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def test_zo_aligns_with_true_gradient_in_low_dimension(device):
    x = torch.randn(4, 1, 4, 4, device=device)      # d = 16
    g, loss = zo_grad(smooth_loss, x, q=4000, mu=1e-3, numsplit=4, generator=gen(device, 0))
    assert g.shape == x.shape
    torch.testing.assert_close(loss, smooth_loss(x))
    assert (cosine(g, true_grad(x)) > 0.9).all()


def test_zo_is_unbiased_on_average(device):
    # 400 independent estimates (q = 20 each) of one image's gradient: each is noisy (cosine well below 1),
    # their mean is close to the true gradient (relative error ~ sqrt(d / (400 q)) ~ 0.05).
    x = torch.randn(1, 1, 3, 4, device=device).expand(400, 1, 3, 4).contiguous()      # d = 12
    g, _ = zo_grad(smooth_loss, x, q=20, mu=1e-3, numsplit=1, generator=gen(device, 1))
    tg = true_grad(x[:1])[0]
    assert cosine(g, tg.expand_as(g)).mean() < 0.95           # single estimates are noisy...
    rel = (g.mean(0) - tg).norm() / tg.norm()
    assert rel < 0.15, f"mean of 400 estimates is {rel:.3f} away from the true gradient (relative)"


@pytest.mark.parametrize("q,numsplit", [(7, 1), (7, 3), (10, 5), (3, 8)])
def test_zo_costs_q_plus_one_queries_per_image(q, numsplit, device):
    seen = []

    def loss_of(x):
        seen.append(x.shape[0])
        return x.flatten(1).sum(1)
    x = torch.rand(6, 3, 4, 4, device=device)
    zo_grad(loss_of, x, q=q, mu=0.01, numsplit=numsplit)
    assert sum(seen) == (q + 1) * 6
    assert seen[0] == 6 and all(n % 6 == 0 for n in seen)      # whole copies of the batch per call


def test_zo_through_the_api_counts_exactly(device):
    api = random_api(device=device)
    target = torch.arange(5, device=device).repeat(2)
    x = torch.rand(10, 3, 32, 32, device=device)
    zo_grad(lambda xs: -torch.log(api(xs)[torch.arange(len(xs), device=device), target.repeat(len(xs) // 10)]),
            x, q=9, mu=0.005, numsplit=4)
    assert api.queries == (9 + 1) * 10


def test_zo_refuses_bad_settings(device):
    x = torch.rand(2, 3, 4, 4, device=device)
    for q, mu in ((0, 0.01), (3, 0.0), (3, -1.0)):
        with pytest.raises(ValueError, match="q >= 1 and mu > 0"):
            zo_grad(smooth_loss, x, q=q, mu=mu, numsplit=1)


def test_zo_same_result_for_any_numsplit_and_layout(device):
    # float64: float32 rounding of L, amplified by d / (q mu) in the finite differences, would blur the check
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, device=device)
    dirs = torch.randn(12, 6, 3, 8, 8, dtype=torch.float64, device=device)
    ref, l0 = zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=1, directions=dirs)
    for s in (3, 5):
        g, l1 = zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=s, directions=dirs)
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(l1, l0)
    # the same directions perturbing a channels-last batch (the layout recover() uses on the CPU)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    g_cl, _ = zo_grad(smooth_loss, x_cl, q=12, mu=1e-2, numsplit=5, directions=dirs)
    torch.testing.assert_close(g_cl, ref, rtol=1e-9, atol=1e-9)
    assert g_cl.is_contiguous(memory_format=torch.channels_last)        # stored like x


def _perturbations(x, **kw):
    """The perturbed images a zero-order step queries, as a set of rows (exact bytes), and its estimate."""
    seen, calls = [], []

    def loss_of(xs):
        calls.append(1)
        if len(calls) > 1:                  # the first call is L(x) itself
            seen.append((xs.contiguous() - x.repeat(xs.shape[0] // x.shape[0], 1, 1, 1)).flatten(1).cpu())
        return smooth_loss(xs)
    g, _ = zo_grad(loss_of, x, **kw)
    rows = torch.cat(seen)
    return rows[rows[:, 0].argsort()], g      # in a fixed order, whichever block ran first


def test_zo_seeded_directions_depend_on_the_generator_only(device):
    """Each direction is drawn from its own seed (on every device): the same seed queries the same perturbed
    images whatever numsplit, the number of blocks per chunk or whether blocks run at once (to the rounding of
    the unit-norm scaling, computed per block: 1e-12 in float64, where another seed differs by 100%)."""
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, device=device)
    kw = dict(q=12, mu=1e-2)
    ref, g_ref = _perturbations(x, numsplit=1, generator=gen(device, 3), **kw)
    for numsplit in (3, 5, 12):
        same, g = _perturbations(x, numsplit=numsplit, generator=gen(device, 3), **kw)
        torch.testing.assert_close(same, ref, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)      # only the sums' order differs
    with accel.zo_lanes(1):
        torch.testing.assert_close(_perturbations(x, numsplit=2, generator=gen(device, 3), **kw)[0], ref,
                                   rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(_perturbations(x, numsplit=2, generator=gen(device, 3), concurrent=False, **kw)[0],
                               ref, rtol=1e-12, atol=1e-15)
    assert torch.equal(_perturbations(x, numsplit=1, generator=gen(device, 3), **kw)[0], ref)   # a rerun: the same bits
    other, _ = _perturbations(x, numsplit=1, generator=gen(device, 4), **kw)
    assert (other - ref).abs().max() > 0.1 * ref.abs().max()


@pytest.mark.cpu_only("lanes (two blocks of directions at once, in two threads) are the CPU's")
def test_zo_lanes_give_the_estimate_of_one_thread():
    """Two blocks of directions at once in two threads, through a real API in float32: the same
    estimate, bit for bit, and the same query count as one block at a time on one thread."""
    api = random_api(device="cpu")
    target = torch.arange(5).repeat(3)
    x = torch.rand(15, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def estimate(concurrent: bool, threads: int):
        with accel.cpu_threads(threads):
            return zo_grad(lambda xs: -torch.log(api(xs)[torch.arange(len(xs)), target.repeat(len(xs) // 15)]),
                           x, q=12, mu=0.005, numsplit=3, generator=torch.Generator().manual_seed(0),
                           concurrent=concurrent)
    (g1, l1), q1 = estimate(False, 1), api.queries
    (g2, l2), q2 = estimate(True, 2), api.queries - q1
    assert q1 == q2 == 13 * 15
    assert torch.equal(g1, g2) and torch.equal(l1, l2) and g1.abs().sum() > 0


def test_surrogate_hands_the_estimate_to_autograd(device):
    x = torch.rand(5, 3, 4, 4, device=device, requires_grad=True)
    g = torch.randn(5, 3, 4, 4, device=device, requires_grad=True)
    (dx, dg) = torch.autograd.grad(surrogate(x, g), (x, g), allow_unused=True)
    torch.testing.assert_close(dx, g.detach() / 5)
    assert dg is None                                                   # the estimate is a constant


# ------------------------------------------------------------------ --zo_estimator central (antithetic pairs)

def quadratic(x):
    """0.5 sum_k lam_k (x_k - 1/2)^2 per image: curvature lam_k from 0.5 to 4, minimum at 1/2."""
    f = x.flatten(1)
    lam = torch.linspace(0.5, 4.0, f.shape[1], dtype=f.dtype, device=f.device)
    return 0.5 * (lam * (f - 0.5) ** 2).sum(1)


def quadratic_grad(x):
    f = x.flatten(1)
    return (torch.linspace(0.5, 4.0, f.shape[1], dtype=f.dtype, device=f.device) * (f - 0.5)).view_as(x)


def test_central_is_unbiased_on_average(device):
    # as the forward test above: 400 estimates of one image's gradient, q = 20 queries each (10 pairs)
    x = torch.randn(1, 1, 3, 4, device=device).expand(400, 1, 3, 4).contiguous()      # d = 12
    g, loss = zo_grad(smooth_loss, x, q=20, mu=1e-3, numsplit=1, generator=gen(device, 1), estimator="central")
    torch.testing.assert_close(loss, smooth_loss(x))                   # L(x) is still returned
    tg = true_grad(x[:1])[0]
    assert cosine(g, tg.expand_as(g)).mean() < 0.95
    rel = (g.mean(0) - tg).norm() / tg.norm()
    assert rel < 0.15, f"mean of 400 central estimates is {rel:.3f} away from the true gradient (relative)"


def test_central_is_the_exact_directional_derivative_on_a_quadratic(device):
    """(L(x + mu u) - L(x - mu u)) / (2 mu) = <grad L(x), u> for a quadratic, whatever mu: with the same
    directions the estimate is (d / m) sum_j <grad L, u_j> u_j (m = q / 2, unit u_j), i.e. the d / m scaling."""
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64, device=device)
    dirs = torch.randn(8, 3, 2, 4, 4, dtype=torch.float64, device=device)
    u = F.normalize(dirs[:4].flatten(2), dim=2)                        # central uses directions 0..q/2-1
    tg = quadratic_grad(x).flatten(1)
    expect = 32 / 4 * torch.einsum("jb,jbd->bd", (u * tg).sum(2), u)
    for mu in (1e-3, 0.3):
        g, _ = zo_grad(quadratic, x, q=8, mu=mu, numsplit=2, directions=dirs, estimator="central")
        torch.testing.assert_close(g.flatten(1), expect, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("q,numsplit", [(8, 1), (8, 3), (10, 5), (4, 8)])
def test_central_costs_q_plus_one_queries_per_image_as_forward(q, numsplit, device):
    for estimator in ("forward", "central"):
        seen = []

        def loss_of(x):
            seen.append(x.shape[0])
            return x.flatten(1).sum(1)
        x = torch.rand(6, 3, 4, 4, device=device)
        zo_grad(loss_of, x, q=q, mu=0.01, numsplit=numsplit, estimator=estimator)
        assert sum(seen) == (q + 1) * 6, estimator
        assert seen[0] == 6 and all(n % 6 == 0 for n in seen)


def test_central_through_the_api_counts_exactly(device):
    api = random_api(device=device)
    target = torch.arange(5, device=device).repeat(2)
    x = torch.rand(10, 3, 32, 32, device=device)
    zo_grad(lambda xs: -torch.log(api(xs)[torch.arange(len(xs), device=device), target.repeat(len(xs) // 10)]),
            x, q=10, mu=0.005, numsplit=4, estimator="central")
    assert api.queries == (10 + 1) * 10


def test_central_does_not_depend_on_numsplit_and_uses_the_forward_directions(device):
    """Seeded: the same perturbed images for any numsplit; they are +-mu u_j for forward's directions
    j < q / 2 of the same seed (q seeds drawn either way: the caller's generator advances alike)."""
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, device=device)
    kw = dict(q=12, mu=1e-2, estimator="central")
    ref, g_ref = _perturbations(x, numsplit=1, generator=gen(device, 3), **kw)
    for numsplit in (2, 4, 6, 9):
        same, g = _perturbations(x, numsplit=numsplit, generator=gen(device, 3), **kw)
        torch.testing.assert_close(same, ref, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)
    fwd, _ = _perturbations(x, numsplit=1, generator=gen(device, 3), q=6, mu=1e-2)   # forward, 6 directions
    both = torch.cat([fwd, -fwd])
    torch.testing.assert_close(ref, both[both[:, 0].argsort()], rtol=1e-12, atol=1e-15)
    g1, g2 = gen(device, 5), gen(device, 5)
    zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=1, generator=g1)
    zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=1, generator=g2, estimator="central")
    assert torch.equal(torch.rand(3, generator=g1, device=device), torch.rand(3, generator=g2, device=device))


@pytest.mark.parametrize("where, better", [("near", "central"), ("far", "forward")])
def test_central_against_forward_on_a_quadratic_at_equal_queries(where, better, device):
    """The cosine to the true gradient, q = 20 (forward: 20 directions, central: 10 pairs), d = 192, float64,
    mean over 64 images x 5 seeds. Forward's coefficient carries the second-order term (mu / 2) u^T H u
    ~ mu tr(H) / (2d) that central cancels; central has half the directions. So central is closer where
    mu tr(H) / (2 sqrt d) exceeds |grad L| (near the minimum, or a large mu), forward elsewhere.
    Measured (AMD EPYC, this seeding): near (|x - 1/2| ~ 0.01, mu 0.05: |grad L| 0.34 against 0.78)
    forward 0.124, central 0.217; far (|x - 1/2| ~ 0.3, mu 0.005) forward 0.305, central 0.217 (exact
    directional derivatives give sqrt(q / (q + d)) = 0.31 and sqrt(10 / (10 + d)) = 0.22 about)."""
    scale, mu = (0.01, 0.05) if where == "near" else (0.3, 0.005)
    x = 0.5 + scale * torch.randn(64, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    tg = quadratic_grad(x)
    mean_cos = {}
    for estimator in ("forward", "central"):
        cs = [cosine(zo_grad(quadratic, x, q=20, mu=mu, numsplit=1, generator=gen(device, s),
                             estimator=estimator)[0], tg).mean().item() for s in range(5)]
        mean_cos[estimator] = sum(cs) / len(cs)
    other = "forward" if better == "central" else "central"
    assert mean_cos[better] > mean_cos[other] + 0.05, mean_cos


def test_recover_queries_antithetic_pairs_with_zo_estimator_central():
    """recover passes --zo_estimator on: q + 1 queries per image per step, and each perturbed call is
    x + mu u then x - mu u around the step's unperturbed batch (the call before it)."""
    from core.config import Config
    from synthesis.recover import recover

    from helpers import FakeAPI
    api = FakeAPI()
    with accel.zo_lanes(1):                 # one block per chunk: numsplit 1 is then one call of the q/2 pairs
        recover(api, 2, Config(ZO=True, q=4, numsplit=1, zo_estimator="central"), steps=2,
                generator=torch.Generator(device=api.device).manual_seed(0))
    n = 3 * 2
    assert api.queries == 2 * (4 + 1) * n
    assert [len(c) for c in api.calls] == [n, 4 * n] * 2
    for x, xs in zip(api.calls[::2], api.calls[1::2]):
        plus, minus = xs.view(2, 2, *x.shape)                            # [+/-, direction, image, ...]
        torch.testing.assert_close((plus + minus) / 2, x.expand_as(plus), rtol=0, atol=1e-6)
        assert (plus - x).abs().max() > 1e-4


def test_central_refuses_an_odd_q_and_an_unknown_estimator(device):
    from core.config import Config, check_values
    from core.errors import FlagError
    x = torch.rand(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="q must be even"):
        zo_grad(smooth_loss, x, q=7, mu=0.01, numsplit=1, estimator="central")
    with pytest.raises(ValueError, match="estimator is one of forward, central"):
        zo_grad(smooth_loss, x, q=8, mu=0.01, numsplit=1, estimator="backward")
    # the config check: one line naming the two flags
    with pytest.raises(FlagError) as e:
        check_values(Config(ZO=True, q=21, zo_estimator="central"))
    assert str(e.value).startswith("--zo_estimator central") and "--q must be even, got 21" in str(e.value)
    assert "\n" not in str(e.value)
    check_values(Config(ZO=True, q=21))                                # forward takes any q
    check_values(Config(ZO=True, q=20, zo_estimator="central"))
    with pytest.raises(FlagError, match="zo_estimator 'backward' is unknown; choose one of forward, central"):
        Config(zo_estimator="backward")


def block_projection(t: torch.Tensor, r: int) -> torch.Tensor:
    """The projection onto images constant on the blocks of an r x r grid: block means, upsampled."""
    return F.interpolate(F.adaptive_avg_pool2d(t, r), size=t.shape[-2:], mode="nearest")


def test_low_resolution_directions_are_block_images_of_radius_mu(device):
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, device=device)
    rows, _ = _perturbations(x, q=6, mu=1e-2, numsplit=2, generator=gen(device, 4), resolution=2)
    assert rows.shape == (18, 3 * 8 * 8)
    torch.testing.assert_close(rows.norm(dim=1), torch.full((18,), 1e-2, dtype=torch.float64))
    images = rows.view(18, 3, 8, 8)
    torch.testing.assert_close(block_projection(images, 2), images)      # constant on 4 x 4 blocks
    with pytest.raises(ValueError, match="must divide"):
        zo_grad(smooth_loss, x, q=4, mu=1e-2, numsplit=1, resolution=3)


def test_low_resolution_estimate_is_unbiased_for_the_projected_gradient(device):
    # the mean of 400 estimates (q = 20, d' = 1 * 2 * 2) is the gradient's block projection, not the gradient
    x = torch.randn(1, 1, 4, 4, device=device).expand(400, 1, 4, 4).contiguous()
    g, _ = zo_grad(smooth_loss, x, q=20, mu=1e-3, numsplit=1, generator=gen(device, 5), resolution=2)
    tg = true_grad(x[:1])
    proj = block_projection(tg, 2)[0]
    assert (g.mean(0) - proj).norm() / proj.norm() < 0.1
    assert (tg[0] - proj).norm() / tg.norm() > 0.2        # the projection is not the whole gradient here


def test_low_resolution_sees_a_smooth_gradient_better_at_equal_queries(device):
    """A gradient made of low frequencies (the logistic term's ramp): 20 directions in 3 * 4 * 4 dimensions
    find it far better than 20 directions in all 3 * 32 * 32."""
    x = torch.rand(16, 3, 32, 32, device=device) * 0.1
    tg = true_grad(x)
    full, _ = zo_grad(smooth_loss, x, q=20, mu=1e-3, numsplit=1, generator=gen(device, 6))
    low, _ = zo_grad(smooth_loss, x, q=20, mu=1e-3, numsplit=1, generator=gen(device, 6), resolution=4)
    assert cosine(low, tg).mean() > 2 * cosine(full, tg).mean()


def test_a_resolution_that_does_not_divide_the_apis_size_is_one_line():
    from core.config import Config
    from core.errors import FlagError
    from methods.checks import check
    check(Config(dataset="demo", ZO=True, zo_resolution=8))
    with pytest.raises(FlagError, match="--zo_resolution 5 must divide the APIs' image size \\(32\\)"):
        check(Config(dataset="demo", ZO=True, zo_resolution=5))
    with pytest.raises(FlagError, match="\\(32 and 84\\)"):        # API-MH: every dataset's size
        check(Config(dataset="mix", pre_backbone="mix", ZO=True, zo_resolution=8))
