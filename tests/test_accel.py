"""accel/: the API's fast forward (inference.py), memory layouts (layout.py), CPU lanes (lanes.py), task
executors (executors.py: sequential, lanes and vmap agree; the rules of `choose`) and the process settings
(process.py). None of it may change what is computed beyond float rounding, and where a docstring says
bit for bit, the tests say torch.equal."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accel
from accel.executors import TaskExec, _ElementwiseBatchNorm
from accel.inference import fold_batchnorm, inference_forward, onednn_chain
from core.errors import FlagError
from dataset import normalize
from methods.maml import adapt, ce_loss, forward, meta_params, task_hits

from helpers import DEMO, meta_model, random_model, random_tasks

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

PREP = lambda x: ((x - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)     # noqa: E731
SIZE = 16               # executors' tests: a 16px conv4 meta model, small enough for the fast tier


def _model(dtype=torch.float32):
    return meta_model(image_size=SIZE, dtype=dtype)


def _tasks(n, way, shot, query, dtype=torch.float32, seed=0):
    return random_tasks(n, way, shot, query, dtype, seed=seed, size=SIZE)


def _items(tasks):
    return [(PREP(t.support_x), t.support_y, PREP(t.query_x), t.query_y) for t in tasks]


# ------------------------------------------------------------------ the API's forward (inference.py)

@pytest.mark.parametrize("arch", ["conv4", "resnet10"])
def test_fast_forward_equals_the_plain_eval_model(arch, device):
    model = random_model(arch).to(device)
    x = torch.randn(70, 3, 32, 32, device=device)
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = accel.api_forward(model, device, micro_batch=32, example=x[:4])     # 70 = 32 + 32 + 6: split
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-4)
    # a folded copy: the model itself keeps its batch-norm, weights and autograd flags
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["conv4", "resnet10"])
def test_fold_batchnorm_is_the_eval_function(arch, device):
    model = random_model(arch).double().to(device)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(5, 3, 32, 32, dtype=torch.float64, device=device)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-10, atol=1e-10)
    assert onednn_chain(fold_batchnorm(random_model("conv4"))) is not None
    assert onednn_chain(fold_batchnorm(random_model("resnet10"))) is None        # not a chain: it stays dense


def test_white_box_forward_passes_gradients_to_the_images_only(device):
    model = random_model("conv4").to(device)
    fn = accel.api_forward(model, device, grad=True, example=torch.randn(2, 3, 32, 32))
    x = torch.randn(4, 3, 32, 32, device=device, requires_grad=True)
    fn(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.cpu_only("the dense channels-last path without oneDNN is the CPU's")
@pytest.mark.parametrize("arch", ["conv4", "resnet10"])
def test_dense_cpu_forward_equals_the_plain_eval_model(arch):
    model = random_model(arch)
    x = torch.randn(70, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        dense = inference_forward(model, "cpu", mkldnn=False, micro_batch=None, example=x[:2])
        torch.testing.assert_close(dense(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cpu_only("oneDNN tensors are the CPU's")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:FutureWarning")   # torch.utils.mkldnn's
def test_onednn_chain_runs_conv4_with_the_converted_modules_kernels():
    """The chain is the folded conv4 on the kernels torch.utils.mkldnn converts it to (the same bits through
    the last pooling), with the head dense (its docstring): the same function to float rounding."""
    import copy

    from torch.utils import mkldnn as mkldnn_utils
    net = fold_batchnorm(random_model("conv4"))
    chain = onednn_chain(net)
    assert chain is not None and onednn_chain(fold_batchnorm(random_model("resnet10"))) is None   # not a chain
    assert onednn_chain(random_model("conv4")) is None                 # untraced: no graph to read
    mk = mkldnn_utils.to_mkldnn(copy.deepcopy(net))                    # (converts the module it is given)
    mods = dict(mk.named_modules())
    x = torch.randn(70, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = chain(x)
        h = x.to_mkldnn()
        for node in mk.graph.nodes:                                     # the converted modules, up to the head
            if node.op == "call_module" and node.target != "head":
                m = mods[node.target]
                h = torch.relu(h) if isinstance(m, nn.ReLU) else m(h)
        trunk = F.linear(h.to_dense().flatten(1), net.head.weight, net.head.bias)
        assert torch.equal(got, trunk)                                  # the same kernels: the same bits
        torch.testing.assert_close(got, mk(x.to_mkldnn()).to_dense(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.cpu_only("the same bits per image whatever the batch: the CPU's kernels (cuDNN may pick another "
                      "algorithm for another batch size)")
def test_micro_batches_are_exact():
    """Splitting a batch into micro-batches is exact: each image is computed on its own."""
    model = random_model("conv4")
    x = torch.randn(70, 3, 32, 32)
    whole = accel.api_forward(model, "cpu", micro_batch=None, example=x[:4])
    split = accel.api_forward(model, "cpu", micro_batch=32, example=x[:4])
    with torch.inference_mode():
        assert torch.equal(whole(x), split(x))


# ------------------------------------------------------------------ memory layouts (layout.py)

def test_fast_layout_and_match_layout():
    cl = torch.channels_last
    m = accel.fast_layout(nn.Conv2d(3, 4, 3))
    assert m.weight.is_contiguous(memory_format=cl) and not m.weight.is_contiguous()
    x = torch.rand(2, 3, 5, 5)
    assert accel.fast_layout(x).is_contiguous(memory_format=cl) and torch.equal(accel.fast_layout(x), x)
    flat = torch.rand(2, 7)
    assert accel.fast_layout(flat) is flat
    assert accel.match_layout(x, m.weight).is_contiguous(memory_format=cl)
    assert accel.match_layout(x, torch.rand(4, 3, 3, 3)) is x


@pytest.mark.parametrize("channels_last", [False, True])
def test_memory_order_reads_images_as_they_are_stored(channels_last):
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    to_flat, from_flat = accel.memory_order(x)
    flat = to_flat(x)
    assert flat.shape == (2, 60) and flat.data_ptr() == x.data_ptr()   # a view, no copy
    order = x[0].permute(1, 2, 0) if channels_last else x[0]           # H, W, C for channels-last
    assert torch.equal(flat[0], order.flatten())
    back = from_flat(flat.clone())
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_affine_normalizer_is_normalize(device):
    x = torch.rand(4, 3, 32, 32, device=device)
    norm = accel.affine_normalizer(DEMO.mean, DEMO.std, 32, device)
    torch.testing.assert_close(norm(x), normalize(x, DEMO.mean, DEMO.std))
    std = (0.2, 0.4, 0.8)
    back = accel.affine_normalizer((0.1, 0.2, 0.3), std, 32, device, inverse=True)
    torch.testing.assert_close(back(normalize(x, (0.1, 0.2, 0.3), std)), x)


# ------------------------------------------------------------------ CPU lanes (lanes.py)

def test_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    with accel.cpu_threads(1):
        assert torch.get_num_threads() == 1
    with accel.cpu_threads(0):                                          # 0: unchanged
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with accel.cpu_threads(1):
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_map_in_lanes_keeps_the_items_order_and_gives_each_lane_its_own_model():
    from accel.lanes import map_in_lanes
    model = nn.Linear(2, 2)
    seen = {}

    def fn(m, item):
        time.sleep(0.02 * (item % 3))                                   # lanes finish out of order
        seen.setdefault(threading.get_ident(), set()).add(id(m))
        return item * 10, m is model, torch.get_num_threads()
    out = map_in_lanes(model, fn, iter(range(11)), lanes=2)
    assert [o[0] for o in out] == [10 * i for i in range(11)]
    assert not any(o[1] for o in out)                                   # never the caller's module
    assert all(len(ids) == 1 for ids in seen.values())                  # one copy per lane thread
    assert {o[2] for o in out} == {max(1, torch.get_num_threads() // 2)}

    def boom(m, item):
        if item == 3:
            raise ValueError("task 3")
        return item
    with pytest.raises(ValueError, match="task 3"):
        map_in_lanes(model, boom, range(8), lanes=2)


@pytest.mark.parametrize("q,numsplit", [(7, 1), (7, 3), (10, 5), (3, 8), (100, 5)])
def test_direction_blocks_cover_the_directions_once_in_order(q, numsplit):
    from accel.lanes import ZO_LANES
    blocks = accel.direction_blocks(q, numsplit, "cpu")
    assert [j for a, b in blocks for j in range(a, b)] == list(range(q))
    assert len(blocks) == sum(min(ZO_LANES, b - a) for a, b in accel.direction_blocks(q, numsplit, "cuda"))
    assert len(accel.direction_blocks(q, numsplit, "cuda")) == min(q, numsplit)
    with accel.zo_lanes(1):                                             # the original's plain loop
        assert accel.direction_blocks(q, numsplit, "cpu") == accel.direction_blocks(q, numsplit, "cuda")
    assert len(accel.direction_blocks(q, numsplit, "cpu")) == len(blocks)


def test_sum_in_order_adds_in_block_order_whichever_block_ends_first():
    blocks = accel.direction_blocks(40, 4, "cpu")
    assert len(blocks) >= 2

    def fn(j0, j1):
        time.sleep(0.01 * (len(blocks) - j0 % len(blocks)) / len(blocks))      # later blocks end first
        return torch.full((3,), 10.0 ** (j0 % 7 * 3 - 9), dtype=torch.float32) * (1 + j1)
    expected = torch.zeros(3)
    for j0, j1 in blocks:
        expected += fn(j0, j1)
    with accel.cpu_threads(2):
        together = accel.sum_in_order(fn, blocks, torch.zeros(3), concurrent=True)
    in_turn = accel.sum_in_order(fn, blocks, torch.zeros(3), concurrent=False)
    assert torch.equal(together, expected) and torch.equal(in_turn, expected)


# ------------------------------------------------------------------ executors: the rules (choose)

@pytest.mark.parametrize("spec, parsed", [("auto", ("auto", None)), ("sequential", ("sequential", None)),
                                          ("lanes", ("lanes", None)), ("lanes:3", ("lanes", 3)),
                                          ("vmap", ("vmap", None)), ("vmap:8", ("vmap", 8))])
def test_parse_task_exec(spec, parsed):
    assert accel.parse_task_exec(spec) == parsed


@pytest.mark.parametrize("spec", ["", "threads", "lanes:x", "vmap:-1", "lanes:0", "auto:2", "sequential:1"])
def test_parse_task_exec_refuses_with_one_line(spec):
    with pytest.raises(FlagError, match="task_exec") as e:
        accel.parse_task_exec(spec)
    assert "\n" not in str(e.value)


def test_choose_rules():
    choose = accel.choose
    with accel.cpu_threads(2):
        assert choose("auto", "cpu") == TaskExec("lanes", 2)              # a lane per thread on a CPU
        assert choose("lanes", "cpu") == TaskExec("lanes", 2)
        assert choose("lanes:3", "cpu") == TaskExec("lanes", 3)
        assert choose("auto", "cpu", world=2) == TaskExec("lanes", 2)
    with accel.cpu_threads(1):
        assert choose("auto", "cpu") == TaskExec("sequential", 1)       # one thread: nothing to share
        assert choose("lanes", "cpu") == TaskExec("sequential", 1)
    assert choose("lanes:1", "cpu") == TaskExec("sequential", 1)
    assert choose("sequential", "cuda") == TaskExec("sequential", 1)
    assert choose("vmap", "cpu") == TaskExec("vmap", 16) and choose("vmap:4", "cpu") == TaskExec("vmap", 4)
    assert choose("auto", "cuda") == TaskExec("vmap", 16)               # a GPU, one process
    assert choose("auto", "cuda:1", world=2) == TaskExec("sequential", 1)   # torchrun spreads the tasks
    with pytest.raises(FlagError, match="lanes run tasks in CPU threads"):
        choose("lanes:2", "cuda")
    with pytest.raises(FlagError, match="under torchrun") as e:
        choose("vmap", "cpu", world=2)
    assert "\n" not in str(e.value)
    assert [str(TaskExec("sequential")), str(TaskExec("lanes", 2)), str(TaskExec("vmap", 8))] == \
        ["sequential", "lanes:2", "vmap:8"]


# ------------------------------------------------------------------ executors: the same numbers

def _adapted_logits(steps=3, lr=0.05, way=5):
    def fn(m, sx, sy, qx, qy):
        params = {k: v.detach() for k, v in meta_params(m).items()}
        return forward(m, adapt(m, params, sx, sy, ce_loss, steps, lr, way=way), qx, way), qy
    return fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_vmapped_map_tasks_equal_one_task_at_a_time(dtype):
    model = _model(dtype)
    items = _items(_tasks(5, 5, 1, 6, dtype, seed=1))
    seq = accel.map_tasks(TaskExec("sequential"), model, _adapted_logits(), items)
    for width in (2, 50):                   # a remainder chunk; fewer tasks than the chunk
        vm = accel.map_tasks(TaskExec("vmap", width), model, _adapted_logits(), iter(items))
        assert len(vm) == len(seq)
        for (lv, yv), (ls, ys) in zip(vm, seq):
            assert torch.equal(yv, ys)
            torch.testing.assert_close(lv, ls, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-4)
            assert not lv.requires_grad
    hits = lambda m, *t: task_hits(m, {k: v.detach() for k, v in meta_params(m).items()}, *t,   # noqa: E731
                                   steps=3, lr=0.05, way=5)
    if dtype == torch.float64:              # float64: no argmax tie flips, the accuracies agree exactly
        assert accel.map_tasks(TaskExec("vmap", 4), model, hits, items) == \
            accel.map_tasks(TaskExec("sequential"), model, hits, items)


def test_vmapped_tasks_are_cut_where_their_shapes_change():
    model = _model(torch.float64)
    tasks = _tasks(3, 5, 1, 4, torch.float64, seed=1) + _tasks(2, 5, 2, 3, torch.float64, seed=2)
    items = _items(tasks)
    seq = accel.map_tasks(TaskExec("sequential"), model, _adapted_logits(), items)
    vm = accel.map_tasks(TaskExec("vmap", 4), model, _adapted_logits(), items)
    assert [lv.shape for lv, _ in vm] == [ls.shape for ls, _ in seq]
    for (lv, _), (ls, _) in zip(vm, seq):
        torch.testing.assert_close(lv, ls, rtol=0, atol=1e-9)


def test_vmapped_grad_tasks_give_one_gradient_per_chunk():
    from methods.maml import task_loss
    model = _model(torch.float64)
    items = _items(_tasks(5, 5, 1, 3, torch.float64, seed=3))
    fn = lambda m, p, *t: task_loss(m, p, *t, steps=2, lr=0.05, way=5, first_order=False)   # noqa: E731
    out = accel.grad_tasks(TaskExec("vmap", 2), model, fn, meta_params(model), items)
    assert [g is not None for _, g in out] == [True, False, True, False, True]     # chunks [0, 1] [2, 3] [4]
    seq = accel.grad_tasks(TaskExec("sequential"), model, fn, meta_params(model), items)
    for (fv, _), (fs, _) in zip(out, seq):
        assert fv[0] == pytest.approx(fs[0], rel=1e-10) and fv[1] == fs[1]
    for k in range(len(seq[0][1])):         # chunk [2, 3]: the sum of the two tasks' gradients
        torch.testing.assert_close(out[2][1][k], seq[2][1][k] + seq[3][1][k], rtol=1e-9, atol=1e-12)


@pytest.mark.cpu_only("lanes are CPU threads")
def test_lanes_give_the_numbers_of_one_thread_bit_for_bit():
    from methods.maml import task_loss
    model = _model()
    items = _items(_tasks(9, 5, 1, 6, seed=3))
    hits = lambda m, *t: task_hits(m, {k: v.detach() for k, v in meta_params(m).items()}, *t,   # noqa: E731
                                   steps=5, lr=0.2, way=5)
    with accel.cpu_threads(1):
        seq = [float(o[0]) for o in accel.map_tasks(TaskExec("sequential"), model, hits, items)]
    assert len(set(seq)) > 3                # tasks the adaptation scores differently
    with accel.cpu_threads(2):              # two lanes of one thread each
        assert [float(o[0]) for o in accel.map_tasks(TaskExec("lanes", 2), model, hits, iter(items))] == seq
        assert torch.get_num_threads() == 2             # the lanes' thread counts stay in the lanes
        # three lanes of (at least) one thread; 9 tasks, so lanes finish out of order
        assert [float(o[0]) for o in accel.map_tasks(TaskExec("lanes", 3), model, hits, iter(items))] == seq
    for first_order in (False, True):
        fn = lambda m, p, *t: task_loss(m, p, *t, steps=3, lr=0.05, way=5, first_order=first_order)  # noqa: E731
        with accel.cpu_threads(1):
            one = accel.grad_tasks(TaskExec("sequential"), model, fn, meta_params(model), items[:5])
        with accel.cpu_threads(2):
            lanes = accel.grad_tasks(TaskExec("lanes", 2), model, fn, meta_params(model), items[:5])
        for (f1, g1), (f2, g2) in zip(one, lanes):
            assert f1 == f2 and all(torch.equal(a, b) for a, b in zip(g1, g2))


# ------------------------------------------------------------------ batch-norm under vmap, the inner gradient

def test_elementwise_batch_norm_matches_torch(device):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.double, device=device)
    w, b = torch.randn(4, dtype=torch.double, device=device), torch.randn(4, dtype=torch.double, device=device)
    with _ElementwiseBatchNorm():
        mine = F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    torch.testing.assert_close(mine, F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5), rtol=0, atol=1e-12)
    rm, rv = torch.randn(4, dtype=torch.double, device=device), torch.rand(4, dtype=torch.double, device=device) + 0.5
    with _ElementwiseBatchNorm():
        ev = F.batch_norm(x, rm, rv, w, b, False)
        with pytest.raises(ValueError, match="batch_stats=True"):
            F.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    torch.testing.assert_close(ev, F.batch_norm(x, rm, rv, w, b, False), rtol=0, atol=1e-12)


def test_torch_batch_norm_rule_is_why_the_decomposition_exists():
    """Without the elementwise batch-norm, vmap(grad) gives a second-order meta-gradient that even reaches
    the conv biases before batch-norm (which cannot change the loss). If this starts failing, PyTorch fixed
    its rule and the decomposition could go."""
    from torch.func import grad, vmap
    way = 5
    model = _model(torch.float64)
    tasks = _tasks(2, way, 1, 3, torch.float64, seed=4)
    params = meta_params(model)
    lo = lambda p, x, y: ce_loss(forward(model, p, x, way), y)     # noqa: E731

    def one(p, sx, sy, qx, qy):
        for _ in range(2):
            g = grad(lo)(p, sx, sy)
            p = {k: p[k] - 0.05 * g[k] for k in p}
        return lo(p, qx, qy)
    sx, qx = torch.stack([PREP(t.support_x) for t in tasks]), torch.stack([PREP(t.query_x) for t in tasks])
    sy, qy = torch.stack([t.support_y for t in tasks]), torch.stack([t.query_y for t in tasks])
    bias = "features.0.0.bias"
    g_native = torch.autograd.grad(vmap(one, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).sum(), params[bias])[0]
    with _ElementwiseBatchNorm():
        g_ours = torch.autograd.grad(vmap(one, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy).sum(),
                                     params[bias])[0]
    assert g_ours.abs().max() < 1e-10
    assert g_native.abs().max() > 1e-6


def test_param_grad_is_the_gradient_with_or_without_a_graph():
    torch.manual_seed(0)
    w = torch.randn(3, 2, dtype=torch.double, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.double)
    loss_of = lambda p: (x @ p["w"]).tanh().square().sum()     # noqa: E731
    want = torch.autograd.grad(loss_of({"w": w}), w)[0]
    g = accel.param_grad(loss_of, {"w": w})
    torch.testing.assert_close(g["w"], want) and None
    assert g["w"].requires_grad                                  # differentiable: second order
    assert not accel.param_grad(loss_of, {"w": w}, create_graph=False)["w"].requires_grad
    frozen = accel.param_grad(loss_of, {"w": w.detach()})        # test time: parameters without grad
    torch.testing.assert_close(frozen["w"], want)
    with torch.no_grad():
        assert not accel.param_grad(loss_of, {"w": w})["w"].requires_grad


# ------------------------------------------------------------------ process settings (process.py)

def test_setup_process_sets_passive_waiting_unless_exported(monkeypatch):
    from accel import process
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    process.setup_process()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    process.setup_process()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.setenv("BIDF_MALLOC", "default")
    assert process.keep_freed_memory() is False
    monkeypatch.delenv("BIDF_MALLOC")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert process.keep_freed_memory() is False
