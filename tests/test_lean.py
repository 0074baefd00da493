"""A lean API visit (the inner loop's graph rebuilt step by step in the outer backward) and the task
memory's append-only checkpoint files: same numbers as before, less memory, smaller saves."""
from __future__ import annotations

import os
import pytest
import torch

from synthesis.memory import TaskMemory

DEVICE = torch.device(os.environ.get("BIDF_TEST_DEVICE", "cpu"))


# ------------------------------------------------------------------ the lean visit


def _visit(lean: bool, *, approx: bool = False, boundary_student: str = "clean", steps: int = 3):
    """One small API visit from fixed seeds: (outcome, meta-gradient, global RNG state after it)."""
    from bench.zo_step import random_api
    from methods.kd import KDSettings, kd_task
    from methods.maml import meta_params
    from methods.meta_train import MetaInput
    from network import build
    from synthesis.recover import ZOConfig
    api = random_api("conv4", 5, 32, DEVICE, 0)
    torch.manual_seed(0)
    model = build("conv4", 5, image_size=32, batch_stats=True).to(DEVICE, memory_format=torch.channels_last)
    prep = MetaInput(32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    s = KDSettings(num_sup_kd=4, num_qur_kd=3, inner_update_num_kd=steps, inner_lr=0.01, generate_iterations=2,
                   zo=ZOConfig(q=4, mu=0.005, numsplit=2), adv=1.0, approx=approx,
                   boundary_student=boundary_student)
    torch.manual_seed(1)
    memory = TaskMemory(4, 32)
    out = kd_task(model, meta_params(model), api, s, prep, boundary=True, memory=memory,
                  generator=torch.Generator(device=DEVICE).manual_seed(0), lean=lean)
    out.loss.backward()
    return out, [p.grad.clone() for p in model.parameters()], torch.get_rng_state(), memory


@pytest.mark.parametrize("boundary_student", ["clean", "perturbed"])
def test_lean_visit_gives_the_same_images_loss_and_meta_gradient(boundary_student):
    full, g_full, rng_full, mem_full = _visit(False, boundary_student=boundary_student)
    lean, g_lean, rng_lean, mem_lean = _visit(True, boundary_student=boundary_student)
    exact = DEVICE.type == "cpu"        # CUDA kernels may sum in another order from run to run
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    assert same(full.support[0], lean.support[0]) and same(full.query[0], lean.query[0])
    assert torch.equal(rng_full, rng_lean)                 # the same random draws, in the same order
    assert same(full.loss.detach(), lean.loss.detach()) and full.acc == pytest.approx(lean.acc)
    assert full.kl_before == pytest.approx(lean.kl_before, rel=1e-6)
    assert all(g.abs().sum() > 0 for g in g_full)
    for a, b in zip(g_full, g_lean):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a - b).abs().max()
    if exact:   # on the CPU the rebuilt graph is the very same computation
        assert all(torch.equal(a, b) for a, b in zip(g_full, g_lean))
    assert mem_full.classes == mem_lean.classes and all(
        torch.equal(a, b) for c in mem_full.classes for a, b in zip(mem_full._store[c], mem_lean._store[c]))


def test_lean_visit_first_order_and_no_inner_step_are_unchanged():
    for kw in ({"approx": True}, {"steps": 0}):
        full, g_full, _, _ = _visit(False, **kw)
        lean, g_lean, _, _ = _visit(True, **kw)
        assert torch.equal(full.loss.detach(), lean.loss.detach())
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(g_full, g_lean))


def test_lean_inner_loop_matches_finite_differences():
    """The meta-gradient of lean_adapt against central differences of the outer loss (float64)."""
    from methods.kd import lean_adapt
    from methods.maml import adapt, forward, kl_loss, meta_params
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    xs, xq = torch.randn(7, 3, dtype=torch.double), torch.randn(6, 3, dtype=torch.double)
    ps, pq = torch.softmax(torch.randn(7, 4, dtype=torch.double), 1), torch.softmax(torch.randn(6, 4, dtype=torch.double), 1)
    params = meta_params(model)
    out = kl_loss(forward(model, lean_adapt(model, params, xs, ps, 3, 0.5, 4), xq), pq)
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(out, list(params.values()))])
    full = kl_loss(forward(model, adapt(model, params, xs, ps, kl_loss, 3, 0.5, way=4), xq), pq)
    want = torch.cat([g.flatten() for g in torch.autograd.grad(full, list(params.values()))])
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-12)
    flat = torch.cat([v.detach().flatten() for v in params.values()])

    def f(vec):
        d, i = {}, 0
        for k, v in params.items():
            d[k] = vec[i:i + v.numel()].view_as(v)
            i += v.numel()
        return kl_loss(forward(model, adapt(model, d, xs, ps, kl_loss, 3, 0.5, way=4, differentiable=False), xq),
                       pq).item()

    eps = 1e-6
    fd = torch.tensor([(f(flat + eps * e) - f(flat - eps * e)) / (2 * eps)
                       for e in torch.eye(len(flat), dtype=torch.double)], dtype=torch.double)
    assert torch.allclose(grad, fd, atol=1e-7, rtol=1e-5)


def test_student_sees_at_most_one_recovered_set_per_forward():
    from methods.kd import bounded_student
    seen = []
    student = bounded_student(lambda x: (seen.append(x.shape[0]), x.sum((1, 2, 3))[:, None])[1], 15)
    x = torch.rand(40, 3, 4, 4)
    assert torch.equal(student(x), x.sum((1, 2, 3))[:, None])
    assert seen == [15, 15, 10]
