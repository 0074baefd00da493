"""Tasks batched with torch.func.vmap: the vmapped evaluation and replay meta-batch give the
one-task-at-a-time results (float64: to rounding; float32: to float tolerance), and a training
run with --replay_vmap draws the same tasks and reaches the same metrics. Evaluation tasks run in
lanes (threads) give a one-thread run's accuracies exactly."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dataset import Task
from core.errors import FlagError
from methods.maml import (_ElementwiseBatchNorm, accuracy_after_adapt, adapt, ce_loss, evaluate, forward,
                          meta_params, query_logits_vmapped, task_accuracies)
from methods.replay import replay_in_lanes, replay_task, replay_tasks
from network import build

from conftest import DEVICE

SIZE = 32


def _prep(x):
    return ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)


def _model(dtype, way=5, seed=0):
    torch.manual_seed(seed)
    return build("conv4", way, image_size=SIZE, batch_stats=True).to(DEVICE, dtype, memory_format=torch.channels_last)


def _tasks(n, way, shot, query, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)     # drawn on the CPU, then moved: the same images on any device
    rel = torch.arange(way)
    return [Task(torch.rand(way * shot, 3, SIZE, SIZE, generator=g, dtype=dtype), rel.repeat_interleave(shot),
                 torch.rand(way * query, 3, SIZE, SIZE, generator=g, dtype=dtype), rel.repeat_interleave(query),
                 np.arange(way)).to(DEVICE) for _ in range(n)]


def _seq_logits(model, params, t, steps, lr, way):
    adapted = adapt(model, params, _prep(t.support_x), t.support_y, ce_loss, steps, lr, way=way, differentiable=False)
    with torch.no_grad():
        return forward(model, adapted, _prep(t.query_x), way)


def test_elementwise_batch_norm_matches_torch(device):
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 4, 5, 5, dtype=torch.double), torch.randn(4, dtype=torch.double), torch.randn(4, dtype=torch.double)
    x, w, b = x.to(device), w.to(device), b.to(device)
    with _ElementwiseBatchNorm():
        mine = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    assert torch.allclose(mine, F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), atol=1e-12)


# ------------------------------------------------------------------ evaluation

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vmapped_evaluation_equals_one_task_at_a_time(dtype):
    way, steps, lr = 5, 10, 0.01
    model = _model(dtype)
    params = meta_params(model)
    tasks = _tasks(7, way, 1, 6, dtype)
    logits, qy = query_logits_vmapped(model, params, tasks, steps, lr, _prep, way)
    for t, lv, y in zip(tasks, logits, qy):
        ls = _seq_logits(model, params, t, steps, lr, way)
        assert torch.allclose(lv, ls, atol=1e-9 if dtype == torch.float64 else 1e-4), (lv - ls).abs().max()
        differ = lv.argmax(-1) != ls.argmax(-1)
        top2 = ls.topk(2, dim=-1).values
        assert ((top2[:, 0] - top2[:, 1])[differ] < 1e-5).all()    # only logits that tie may disagree
        assert torch.equal(y, t.query_y)
    seq = evaluate(model, params, tasks, steps, lr, _prep, way, DEVICE)
    for chunk in (3, 7, 50):        # a remainder chunk, one chunk, fewer tasks than the chunk
        mean, ci = evaluate(model, params, iter(tasks), steps, lr, _prep, way, DEVICE, chunk=chunk)
        assert mean == pytest.approx(seq[0], abs=1e-9) and ci == pytest.approx(seq[1], abs=1e-9)


def test_vmapped_evaluation_per_task_accuracies_and_mixed_shapes():
    from methods.maml import accuracies_vmapped
    way = 5
    model = _model(torch.float32)
    params = meta_params(model)
    tasks = _tasks(3, way, 1, 4, torch.float32, seed=1) + _tasks(2, way, 2, 3, torch.float32, seed=2)
    seq = [accuracy_after_adapt(model, params, t, 3, 0.01, _prep, way) for t in tasks]
    assert accuracies_vmapped(model, params, tasks[:3], 3, 0.01, _prep, way) == seq[:3]
    # shapes change inside the stream: cut into chunks of equal shapes
    assert evaluate(model, params, tasks, 3, 0.01, _prep, way, DEVICE, chunk=4) == \
        pytest.approx(evaluate(model, params, tasks, 3, 0.01, _prep, way, DEVICE), abs=1e-9)


@pytest.mark.cpu_only("evaluation lanes are CPU threads")
def test_evaluation_lanes_give_the_accuracies_of_one_thread():
    way, steps, lr = 5, 10, 0.05
    model = _model(torch.float32)
    params = meta_params(model)
    tasks = _tasks(13, way, 1, 15, torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seq = task_accuracies(model, params, tasks, steps, lr, _prep, way, DEVICE)
        assert len(set(seq)) > 3                    # tasks the adaptation scores differently
        torch.set_num_threads(2)                    # two lanes of one thread each
        assert task_accuracies(model, params, iter(tasks), steps, lr, _prep, way, DEVICE, lanes=2) == seq
        assert torch.get_num_threads() == 2         # the lanes' thread counts stay in the lanes
        # three lanes of (at least) one thread; 13 tasks, so lanes finish out of order
        assert task_accuracies(model, params, iter(tasks), steps, lr, _prep, way, DEVICE, lanes=3) == seq
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(FlagError, match="--eval_chunk 1"):
        task_accuracies(model, params, tasks, steps, lr, _prep, way, DEVICE, chunk=4, lanes=2)


# ------------------------------------------------------------------ replay meta-batch

def _replay_grads(model, tasks, vmapped, first_order, way):
    model.zero_grad(set_to_none=True)
    kw = dict(steps=3, lr=0.05, first_order=first_order, prep=_prep, way=way)
    if vmapped:
        losses, accs = replay_tasks(model, meta_params(model), tasks, **kw)
        losses.sum().backward()
        total = losses.sum().item()
    else:
        total, accs = 0.0, []
        for t in tasks:
            loss, acc = replay_task(model, meta_params(model), t, **kw)
            loss.backward()
            total += loss.item()
            accs.append(acc)
    return total, accs, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vmapped_replay_batch_equals_sequential(first_order, dtype):
    way = 5
    model = _model(dtype, way=way)
    tasks = _tasks(4, way, 1, 3, dtype, seed=3)
    l1, a1, g1 = _replay_grads(model, tasks, False, first_order, way)
    l2, a2, g2 = _replay_grads(model, tasks, True, first_order, way)
    scale = max(g.abs().max().item() for g in g1)
    assert scale > 1e-3
    # float32: the second-order inner loop amplifies rounding (the sequential path itself is ~0.3%
    # from float64 here), hence the looser tolerance
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    assert l2 == pytest.approx(l1, rel=1e-12 if dtype == torch.float64 else 1e-5)
    assert a1 == a2
    for a, b in zip(g1, g2):
        assert (a - b).abs().max().item() <= tol * scale


@pytest.mark.cpu_only("replay lanes are CPU threads")
@pytest.mark.parametrize("first_order", [False, True])
def test_replay_lanes_give_the_gradients_of_one_thread(first_order):
    way = 5
    model = _model(torch.float32, way=way)
    tasks = _tasks(5, way, 1, 3, torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seq = []
        for t in tasks:                                 # what meta_batch's one-task path leaves in .grad
            model.zero_grad(set_to_none=True)
            loss, acc = replay_task(model, meta_params(model), t, steps=3, lr=0.05, first_order=first_order,
                                    prep=_prep, way=way)
            loss.backward()
            seq.append((loss.item(), acc, [p.grad.clone() for p in model.parameters()]))
        torch.set_num_threads(2)                        # two lanes of one thread each
        lanes = replay_in_lanes(model, meta_params(model), tasks, lanes=2, steps=3, lr=0.05,
                                first_order=first_order, prep=_prep, way=way)
    finally:
        torch.set_num_threads(threads)
    assert len(lanes) == len(tasks)
    for (l1, a1, g1), (l2, a2, g2) in zip(seq, lanes):
        assert l1 == l2 and a1 == a2
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_torch_batch_norm_rule_is_why_the_decomposition_exists():
    """Without the elementwise batch-norm, vmap(grad) gives a second-order meta-gradient that
    even reaches the conv biases before batch-norm (which cannot change the loss). If this
    starts failing, PyTorch fixed its rule and the decomposition could go."""
    from torch.func import grad, vmap
    way = 5
    model = _model(torch.float64, way=way)
    tasks = _tasks(2, way, 1, 3, torch.float64, seed=4)
    params = meta_params(model)
    lo = lambda p, x, y: ce_loss(forward(model, p, x, way), y)     # noqa: E731

    def one(p, sx, sy, qx, qy):
        for _ in range(2):
            g = grad(lo)(p, sx, sy)
            p = {k: p[k] - 0.05 * g[k] for k in p}
        return lo(p, qx, qy)
    sx = torch.stack([_prep(t.support_x) for t in tasks])
    qx = torch.stack([_prep(t.query_x) for t in tasks])
    sy, qy = torch.stack([t.support_y for t in tasks]), torch.stack([t.query_y for t in tasks])
    bias = "features.0.0.bias"
    g_native = torch.autograd.grad(vmap(one, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).sum(), params[bias])[0]
    with _ElementwiseBatchNorm():
        g_ours = torch.autograd.grad(vmap(one, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).sum(),
                                     params[bias])[0]
    assert g_ours.abs().max() < 1e-10
    assert g_native.abs().max() > 1e-6


# ------------------------------------------------------------------ the training loop

def _run(demo_root, demo_pool, out, *extra, hook=None):
    from main import parse_args
    from methods.meta_train import Trainer
    from test_meta import _flags
    tr = Trainer(parse_args(_flags(demo_root, demo_pool, out, "--episode_train", "12", "--val_interval", "12",
                                   "--save_interval", "12", *extra)))
    if hook:
        hook(tr)
    tr.run()
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return ck, [json.loads(line) for line in f]


def _replay_grad(model, tasks, cfg, prep, vmapped):
    params = meta_params(model)
    kw = dict(steps=cfg.inner_update_num, lr=cfg.inner_lr, first_order=cfg.approx, prep=prep, way=cfg.way_train)
    if vmapped:
        losses, accs = replay_tasks(model, params, tasks, **kw)
        loss = losses.sum()
    else:
        out = [replay_task(model, params, t, **kw) for t in tasks]
        loss, accs = sum(o[0] for o in out), [o[1] for o in out]
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=vmapped)
    return loss.item(), accs, torch.cat([g.double().flatten() for g in grads])


def _check_against_sequential(tr, seen: list):
    """Each vmapped replay meta-batch of the run against the one-task path on the same drawn tasks
    and the same θ, both in float32 and float64. The recovered images are 8-bit, so max-pool
    windows hold exact ties, and float32 rounding may route a gradient to either of two tied
    pixels (on either path; a few % of the gradient's norm at most): float32 is judged by its
    distance to the float64 one-task gradient. (Adam then
    amplifies rounding in near-zero gradient components, so whole runs drift apart.)"""
    vmapped, cfg = tr.replay_together, tr.cfg

    def both(tasks):
        double = copy.deepcopy(tr.model).double()
        tasks64 = [Task(t.support_x.double(), t.support_y, t.query_x.double(), t.query_y, t.classes) for t in tasks]
        l64, a64, g64 = _replay_grad(double, tasks64, cfg, tr.prep, False)
        lv64, av64, gv64 = _replay_grad(double, tasks64, cfg, tr.prep, True)
        scale = g64.abs().max().item()
        assert lv64 == pytest.approx(l64, rel=1e-10) and av64 == a64
        assert (gv64 - g64).abs().max().item() <= 1e-9 * scale
        l32, _, g32 = _replay_grad(tr.model, tasks, cfg, tr.prep, False)
        losses, accs = vmapped(tasks)
        gv32 = torch.cat([g.double().flatten() for g in torch.autograd.grad(
            losses.sum(), list(meta_params(tr.model).values()), retain_graph=True)])
        assert losses.sum().item() == pytest.approx(l32, rel=1e-5)
        # either float32 path may route a tie's gradient to the other pixel: judged by the size of
        # that effect (measured up to a few % of the norm, on either path), the exact check is float64's
        assert (gv32 - g64).norm() <= max(2 * (g32 - g64).norm(), 0.05 * g64.norm())
        seen.append(len(tasks))
        return losses, accs
    tr.replay_together = both


@pytest.mark.parametrize("extra", [(), ("--approx", "--replay_augment")], ids=["second_order", "approx_augment"])
def test_replay_vmap_run_draws_the_same_tasks(demo_root, demo_pool, tmp_path, extra):
    seen = []
    ck1, m1 = _run(demo_root, demo_pool, str(tmp_path / "seq"), *extra)
    ck2, m2 = _run(demo_root, demo_pool, str(tmp_path / "vmap"), "--replay_vmap", *extra,
                   hook=lambda tr: _check_against_sequential(tr, seen))
    assert sum(seen) >= 6           # most of the 12 tasks were replays, checked batch by batch
    # the same tasks and APIs: every draw comes from (seed, task id), however the tasks are run
    for k in ("task", "api_visits", "api_queries"):
        assert ck1["state"][k] == ck2["state"][k], k
    assert [(r["split"], r["task"]) for r in m1] == [(r["split"], r["task"]) for r in m2]
    s1, s2 = ck1["memory"]["store"], ck2["memory"]["store"]     # the same classes and images recovered
    assert {c: [b.shape for b in v] for c, v in s1.items()} == {c: [b.shape for b in v] for c, v in s2.items()}


@pytest.mark.cpu_only("lanes are CPU threads")
def test_run_with_lanes_is_the_one_thread_run_bit_for_bit(demo_root, demo_pool, tmp_path):
    from core.device import cpu_threads
    with cpu_threads(1):            # lanes of one thread each: the one-thread run's numbers exactly
        ck1, m1 = _run(demo_root, demo_pool, str(tmp_path / "seq"))
        ck2, m2 = _run(demo_root, demo_pool, str(tmp_path / "lanes"), "--replay_lanes", "3", "--eval_lanes", "2")
    assert ck1["state"]["task"] == 12 and ck1["state"]["api_visits"] >= 1
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]   # noqa: E731
    assert drop(m1) == drop(m2)
    assert ck1["model"].keys() == ck2["model"].keys()
    assert all(torch.equal(ck1["model"][k], ck2["model"][k]) for k in ck1["model"])
