"""methods/maml.py: the one inner loop and the per-task functions. Second-order meta-gradients match finite
differences; first order drops exactly the second-order term; recompute=True (one step's graph rebuilt at a
time in the outer backward) gives the same bits as keeping the graph, and both match finite differences;
test-time adaptation keeps no graph; vmapped tasks give the one-task path's numbers in float64, first and
second order; the losses, accuracies and intervals are what they say."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import accel
from accel.executors import TaskExec
from methods.maml import (adapt, ce_loss, confidence_interval, forward, hits, kl_loss, meta_params, percent,
                          task_hits, task_loss)

from conftest import ON_CPU
from helpers import flat_grads, meta_model, random_tasks

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

PREP = lambda x: ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)     # noqa: E731


@pytest.fixture
def tiny_task(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    xs, ys = torch.randn(6, 3, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1, 2])
    xq, yq = torch.randn(9, 3, dtype=torch.double), torch.tensor([0, 1, 2] * 3)
    return tuple(t.to(device) for t in (model, xs, ys, xq, yq))     # drawn on the CPU: the same values anywhere


def _outer(model, params, task, **kw):
    _, xs, ys, xq, yq = task
    adapted = adapt(model, params, xs, ys, ce_loss, 3, 0.5, **kw)
    return ce_loss(forward(model, adapted, xq), yq), adapted


def _meta_grad(model, task, **kw) -> torch.Tensor:
    """The meta-gradient through loss.backward() (what the method does), as one vector."""
    model.zero_grad(set_to_none=True)
    loss, _ = _outer(model, meta_params(model), task, **kw)
    loss.backward()
    g = flat_grads(model.parameters())
    model.zero_grad(set_to_none=True)
    return g


def _finite_differences(model, fn, eps=1e-6) -> torch.Tensor:
    """Central differences of fn(params) (a float, computed without a graph) in every parameter."""
    params = meta_params(model)
    flat = torch.cat([v.detach().flatten() for v in params.values()])

    def f(vec):
        d, i = {}, 0
        for k, v in params.items():
            d[k] = vec[i:i + v.numel()].view_as(v)
            i += v.numel()
        with torch.no_grad():
            return fn(d)
    return torch.tensor([(f(flat + eps * e) - f(flat - eps * e)) / (2 * eps)
                         for e in torch.eye(len(flat), dtype=flat.dtype, device=flat.device)], dtype=torch.double)


@pytest.mark.parametrize("recompute", [False, True])
def test_second_order_meta_gradient_matches_finite_differences(tiny_task, recompute):
    model = tiny_task[0]
    grad = _meta_grad(model, tiny_task, recompute=recompute).cpu()
    fd = _finite_differences(model, lambda p: _outer(model, p, tiny_task)[0].item())
    assert fd.abs().max() > 1e-3                     # a real gradient, not zeros
    assert torch.allclose(grad, fd, atol=1e-7, rtol=1e-6), (grad - fd).abs().max()


def test_kl_inner_loop_meta_gradient_matches_finite_differences(device):
    """The visit's inner loop (KL to API probabilities, recompute as the visit runs it) against central
    differences of the outer KL (float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    xs, xq = torch.randn(7, 3, dtype=torch.double), torch.randn(6, 3, dtype=torch.double)
    ps = torch.softmax(torch.randn(7, 4, dtype=torch.double), 1)
    pq = torch.softmax(torch.randn(6, 4, dtype=torch.double), 1)
    model, xs, xq, ps, pq = (t.to(device) for t in (model, xs, xq, ps, pq))

    def outer(p, recompute=False):
        return kl_loss(forward(model, adapt(model, p, xs, ps, kl_loss, 3, 0.5, recompute=recompute), xq), pq)
    outer(meta_params(model), recompute=True).backward()
    grad = flat_grads(model.parameters()).cpu()
    fd = _finite_differences(model, lambda p: outer(p).item())
    assert fd.abs().max() > 1e-4 and torch.allclose(grad, fd, atol=1e-7, rtol=1e-5), (grad - fd).abs().max()


def test_first_order_drops_the_second_order_term(tiny_task):
    model = tiny_task[0]
    g2 = _meta_grad(model, tiny_task)
    g1 = _meta_grad(model, tiny_task, first_order=True)
    # first order: the meta-gradient is the query-loss gradient taken at θ' (dθ'/dθ = I)
    _, adapted = _outer(model, meta_params(model), tiny_task, first_order=True)
    at = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    _, _, _, xq, yq = tiny_task
    g_at = torch.cat([g.flatten() for g in torch.autograd.grad(ce_loss(forward(model, at, xq), yq),
                                                               list(at.values()))])
    assert torch.allclose(g1, g_at, atol=1e-12)
    assert (g1 - g2).norm() > 0.05 * g2.norm()       # the dropped Hessian term is not negligible here
    # and recompute changes nothing there either
    assert torch.allclose(_meta_grad(model, tiny_task, first_order=True, recompute=True), g1, rtol=0, atol=1e-15)


@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("first_order", [False, True])
def test_recompute_gives_the_same_bits_as_keeping_the_graph(loss, first_order):
    """The lean inner loop (recompute=True, torch.utils.checkpoint per step) against the kept graph on a
    float32 conv4: the same θ' and the same meta-gradient, bit for bit on the CPU (to float rounding elsewhere)."""
    model = meta_model()
    t = random_tasks(1, 5, 2, 3, seed=5)[0]
    sx, qx = PREP(t.support_x), PREP(t.query_x)
    if loss == "ce":
        fn, target, qtarget = ce_loss, t.support_y, t.query_y
    else:
        g = torch.Generator().manual_seed(1)
        fn = kl_loss
        target = torch.softmax(torch.randn(10, 5, generator=g), 1).to(sx.device)
        qtarget = torch.softmax(torch.randn(15, 5, generator=g), 1).to(sx.device)
    out = {}
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        adapted = adapt(model, meta_params(model), sx, target, fn, 3, 0.1, way=5, first_order=first_order,
                        recompute=recompute)
        outer = fn(forward(model, adapted, qx, 5), qtarget)
        outer.backward()
        out[recompute] = ({k: v.detach() for k, v in adapted.items()}, outer.detach(),
                          [p.grad.clone() for p in model.parameters()])
    (a0, l0, g0), (a1, l1, g1) = out[False], out[True]
    assert all(g.abs().sum() > 0 for g in g0)
    same = torch.equal if ON_CPU else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
    assert same(l0, l1) and all(same(a0[k], a1[k]) for k in a0)
    assert all(same(a, b) for a, b in zip(g0, g1))


def test_zero_steps_is_theta_itself(tiny_task):
    model = tiny_task[0]
    params = meta_params(model)
    assert all(v is params[k] for k, v in adapt(model, params, tiny_task[1], tiny_task[2], ce_loss, 0, 0.5).items())


def test_test_time_adaptation_builds_no_graph(tiny_task):
    model, xs, ys, _, _ = tiny_task
    with torch.no_grad():
        adapted = adapt(model, meta_params(model), xs, ys, ce_loss, 2, 0.5)
        frozen = adapt(model, {k: v.detach() for k, v in meta_params(model).items()}, xs, ys, ce_loss, 2, 0.5)
    assert all(v.grad_fn is None and not v.requires_grad for v in adapted.values())
    assert all(torch.equal(adapted[k], frozen[k]) for k in adapted)
    with torch.no_grad():
        moved = any(not torch.equal(adapted[k], v) for k, v in meta_params(model).items())
    assert moved                                                          # it did adapt
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ the per-task functions

def test_task_loss_and_task_hits_are_adapt_then_the_query_set(device):
    model = meta_model(dtype=torch.float64)
    t = random_tasks(1, 5, 1, 4, torch.float64, seed=2)[0]
    sx, sy, qx, qy = PREP(t.support_x), t.support_y, PREP(t.query_x), t.query_y
    params = meta_params(model)
    loss, acc = task_loss(model, params, sx, sy, qx, qy, steps=2, lr=0.05, way=5, first_order=False)
    logits = forward(model, adapt(model, params, sx, sy, ce_loss, 2, 0.05, way=5), qx, 5)
    torch.testing.assert_close(loss, ce_loss(logits, qy))
    assert loss.requires_grad and not acc.requires_grad and float(acc) == float(hits(logits, qy))
    with torch.no_grad():
        h = task_hits(model, {k: v.detach() for k, v in params.items()}, sx, sy, qx, qy, steps=2, lr=0.05, way=5)
    assert float(h) == float(acc)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vmapped_tasks_give_the_one_task_path(first_order, dtype):
    """A meta-batch's replay tasks vmapped (accel.grad_tasks with TaskExec vmap) against one task at a time:
    losses, accuracies and the summed meta-gradient, second order included; float64 to rounding, float32 to
    float tolerance (the second-order inner loop amplifies rounding: the one-task path itself is ~0.3% from
    float64 here)."""
    model = meta_model(dtype=dtype, image_size=16)
    items = [(PREP(t.support_x), t.support_y, PREP(t.query_x), t.query_y)
             for t in random_tasks(4, 5, 1, 3, dtype, seed=3, size=16)]
    fn = lambda m, p, *t: task_loss(m, p, *t, steps=3, lr=0.05, way=5, first_order=first_order)   # noqa: E731
    seq = accel.grad_tasks(TaskExec("sequential"), model, fn, meta_params(model), items)
    vm = accel.grad_tasks(TaskExec("vmap", 4), model, fn, meta_params(model), items)
    f64 = dtype == torch.float64
    for (fs, _), (fv, _) in zip(seq, vm):
        assert fv[0] == pytest.approx(fs[0], rel=1e-12 if f64 else 1e-5) and fv[1] == fs[1]
    total = [sum(g[k] for _, g in seq) for k in range(len(seq[0][1]))]
    scale = max(g.abs().max().item() for g in total)
    assert scale > 1e-3
    for a, b in zip(vm[0][1], total):
        assert (a - b).abs().max().item() <= (1e-10 if f64 else 2e-2) * scale


def test_kl_loss_is_a_proper_kl(device):
    torch.manual_seed(0)
    logits, other = torch.randn(7, 5, device=device), torch.randn(7, 5, device=device)
    p = torch.softmax(other, 1)
    want = (p * (p.log() - torch.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(kl_loss(logits, p), want, atol=1e-6)
    assert kl_loss(other, p).abs() < 1e-6


def test_forward_restricts_the_head_to_the_tasks_classes():
    model = meta_model(way=10)
    x = torch.rand(4, 3, 32, 32).to(next(model.parameters()).device)
    full = forward(model, meta_params(model), x)
    assert full.shape == (4, 10) and torch.equal(forward(model, meta_params(model), x, 5), full[:, :5])
    # adapt's way defaults to the width of a probability target
    p = torch.softmax(torch.randn(4, 5), 1).to(x.device)
    with torch.no_grad():
        a = adapt(model, meta_params(model), x, p, kl_loss, 1, 0.1)
        b = adapt(model, meta_params(model), x, p, kl_loss, 1, 0.1, way=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["head.weight"][5:], meta_params(model)["head.weight"][5:].detach())   # unused outputs


def test_hits_percent_and_confidence_interval():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    assert float(hits(logits, torch.tensor([0, 1, 1, 1]))) == 0.75 and percent(torch.tensor(0.75)) == 75.0
    accs = [20.0, 40.0, 60.0, 80.0]
    mean, ci = confidence_interval(accs)
    assert mean == 50.0 and ci == pytest.approx(1.96 * np.std(accs) / math.sqrt(4))
    assert confidence_interval(iter([30.0, 30.0])) == (30.0, 0.0)
