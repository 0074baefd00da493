"""synthesis/: the black-box boundary, the zero-order estimator, the API pool, generator inversion
and the task memory."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import network
from core.errors import CheckpointError, DataError
from dataset.specs import get_spec
from synthesis import APIPool, BlackBoxAPI, QueryBudgetExceeded, TaskMemory, ZOConfig, surrogate, zo_grad
from synthesis.api import fold_batchnorm, inference_forward, onednn_chain
from synthesis.memory import check_replay_flags
from synthesis.store import pool_dir
from synthesis.recover import affine_normalizer, recover

from conftest import DEVICE, run_cli

DEMO = get_spec("demo")


def random_model(arch: str, way: int = 5, image_size: int = 32, seed: int = 0) -> nn.Module:
    """An eval-mode network with non-trivial batch-norm statistics (so folding them matters)."""
    torch.manual_seed(seed)
    m = network.build(arch, way, image_size=image_size).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.normal_(1.0, 0.2)
            mod.bias.data.normal_(0.0, 0.2)
    return m


def cosine(a, b):
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


# ----------------------------------------------------------------------------- zero-order estimator

def smooth_loss(x):
    """Per-image logistic + quadratic loss with a known autograd gradient."""
    f = x.flatten(1)
    w = torch.linspace(-1, 1, f.shape[1], dtype=f.dtype, device=f.device)
    return F.softplus(-(f * w).sum(1)) + 0.3 * (f ** 2).sum(1)


def true_grad(x):
    x = x.clone().requires_grad_()
    smooth_loss(x).sum().backward()
    return x.grad


def test_zo_aligns_with_true_gradient_in_low_dimension(device):
    x = torch.randn(4, 1, 4, 4, device=device)      # d = 16
    g, loss = zo_grad(smooth_loss, x, q=4000, mu=1e-3, numsplit=4,
                      generator=torch.Generator(device=device).manual_seed(0))
    assert g.shape == x.shape
    torch.testing.assert_close(loss, smooth_loss(x))
    assert (cosine(g, true_grad(x)) > 0.9).all()


def test_zo_is_unbiased_on_average(device):
    # 400 independent estimates (q = 20 each) of one image's gradient: each is noisy (cosine well below 1),
    # their mean is close to the true gradient (relative error ~ sqrt(d / (400 q)) ~ 0.05).
    x = torch.randn(1, 1, 3, 4, device=device).expand(400, 1, 3, 4).contiguous()      # d = 12
    g, _ = zo_grad(smooth_loss, x, q=20, mu=1e-3, numsplit=1, generator=torch.Generator(device=device).manual_seed(1))
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
    api = BlackBoxAPI(random_model("conv4"), range(5), DEMO, "conv4", device=device)
    target = torch.arange(5, device=device).repeat(2)
    x = torch.rand(10, 3, 32, 32, device=device)
    zo_grad(lambda xs: -torch.log(api(xs)[torch.arange(len(xs), device=device), target.repeat(len(xs) // 10)]),
            x, q=9, mu=0.005, numsplit=4)
    assert api.queries == (9 + 1) * 10


def test_zo_same_result_for_any_numsplit(device):
    # float64: float32 rounding of L, amplified by d / (q mu) in the finite differences, would blur the check
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, device=device)
    dirs = torch.randn(12, 6, 3, 8, 8, dtype=torch.float64, device=device)
    ref, l0 = zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=1, directions=dirs)
    for s in (3, 5):
        g, l1 = zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=s, directions=dirs)
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(l1, l0)
    # the same directions perturbing a channels-last batch (the layout recover() uses on the CPU)
    g_cl, _ = zo_grad(smooth_loss, x.contiguous(memory_format=torch.channels_last), q=12, mu=1e-2,
                      numsplit=5, directions=dirs)
    torch.testing.assert_close(g_cl, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.cpu_only("on the CPU each direction is drawn from its own seed; elsewhere one draw per chunk, so "
                      "a seed's directions depend on numsplit")
def test_zo_seeded_directions_do_not_depend_on_numsplit():
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    # drawn here from a seed: on the CPU the directions, hence the estimate, do not depend on numsplit
    by_seed = [zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=s, generator=torch.Generator().manual_seed(3))[0]
               for s in (1, 3, 5)]
    for g in by_seed[1:]:
        torch.testing.assert_close(g, by_seed[0], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(by_seed[0], zo_grad(smooth_loss, x, q=12, mu=1e-2, numsplit=1,
                                                  generator=torch.Generator().manual_seed(4))[0])


@pytest.mark.cpu_only("lanes (two blocks of directions at once, in two threads) are the CPU's")
def test_zo_lanes_give_the_estimate_of_one_thread():
    """Two blocks of directions at once in two threads, through a real API in float32: the same
    estimate, bit for bit, and the same query count as one block at a time on one thread."""
    api = BlackBoxAPI(random_model("conv4"), range(5), DEMO, "conv4")
    target = torch.arange(5).repeat(3)
    x = torch.rand(15, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def estimate(concurrent: bool, threads: int):
        torch.set_num_threads(threads)
        try:
            return zo_grad(lambda xs: -torch.log(api(xs)[torch.arange(len(xs)), target.repeat(len(xs) // 15)]),
                           x, q=12, mu=0.005, numsplit=3, generator=torch.Generator().manual_seed(0),
                           concurrent=concurrent)
        finally:
            torch.set_num_threads(min(2, os.cpu_count() or 1))
    (g1, l1), q1 = estimate(False, 1), api.queries
    (g2, l2), q2 = estimate(True, 2), api.queries - q1
    assert q1 == q2 == 13 * 15
    assert torch.equal(g1, g2) and torch.equal(l1, l2) and g1.abs().sum() > 0


def test_surrogate_hands_the_estimate_to_autograd(device):
    x = torch.rand(5, 3, 4, 4, device=device, requires_grad=True)
    g = torch.randn(5, 3, 4, 4, device=device)
    (dx,) = torch.autograd.grad(surrogate(x, g), x)
    torch.testing.assert_close(dx, g / 5)


# ----------------------------------------------------------------------------- the black box

def test_black_box_returns_probabilities_without_autograd_history(device):
    api = BlackBoxAPI(random_model("conv4"), [3, 9, 11, 20, 40], DEMO, "conv4", device=device)
    x = torch.randn(7, 3, 32, 32, device=device, requires_grad=True)
    p = api(x)
    assert p.shape == (7, 5) and not p.requires_grad and p.grad_fn is None
    torch.testing.assert_close(p.sum(1), torch.ones(7, device=device))
    with pytest.raises(RuntimeError):
        p.sum().backward()
    assert x.grad is None
    # later differentiable use of the answer (e.g. a KL to a student) works: it is an ordinary tensor
    s = torch.randn(7, 5, device=device, requires_grad=True)
    (p * F.log_softmax(s, 1)).sum().backward()
    assert s.grad is not None
    # nothing public leads to the weights
    assert not isinstance(api, nn.Module) and not hasattr(api, "model") and not hasattr(api, "parameters")
    assert not any(isinstance(v, (nn.Module, torch.Tensor)) for v in vars(api).values())


def test_white_box_api_lets_gradients_reach_the_images_only(device):
    api = BlackBoxAPI(random_model("conv4"), range(5), DEMO, "conv4", white_box=True, device=device)
    x = torch.randn(4, 3, 32, 32, device=device, requires_grad=True)
    api(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_queries_counted_and_budget_enforced(device):
    api = BlackBoxAPI(random_model("conv4"), range(5), DEMO, "conv4", budget=10, device=device)
    api(torch.rand(6, 3, 32, 32, device=device))
    assert api.queries == 6
    with pytest.raises(QueryBudgetExceeded) as e:
        api(torch.rand(5, 3, 32, 32, device=device))
    msg = str(e.value)
    assert "budget of 10" in msg and "\n" not in msg and isinstance(e.value, Exception)
    assert api.queries == 6                         # the refused call was not served
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        api(torch.rand(2, 3, 28, 28, device=device))


@pytest.mark.parametrize("arch", ["conv4", "resnet10"])
def test_fast_api_equals_plain_eval_model(arch, device):
    model = random_model(arch).to(device)
    x = torch.randn(70, 3, 32, 32, device=device)
    with torch.no_grad():
        ref = F.softmax(model(x), 1)
    api = BlackBoxAPI(model, range(5), DEMO, arch, micro_batch=32, device=device)   # 70 = 32 + 32 + 6: splitting
    torch.testing.assert_close(api(x), ref, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())     # a copy was folded, not the model


@pytest.mark.cpu_only("the dense channels-last path without oneDNN is the CPU's")
@pytest.mark.parametrize("arch", ["conv4", "resnet10"])
def test_dense_cpu_api_equals_plain_eval_model(arch):
    model = random_model(arch)
    x = torch.randn(70, 3, 32, 32)
    with torch.no_grad():
        ref = F.softmax(model(x), 1)
    dense = inference_forward(model, "cpu", mkldnn=False, micro_batch=None, example=x[:2])
    with torch.no_grad():
        torch.testing.assert_close(F.softmax(dense(x), 1), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.cpu_only("oneDNN tensors are the CPU's")
def test_onednn_chain_runs_conv4_with_the_converted_modules_kernels():
    from torch.utils import mkldnn as mkldnn_utils
    net = fold_batchnorm(random_model("conv4"))
    chain = onednn_chain(net)
    assert chain is not None and onednn_chain(fold_batchnorm(random_model("resnet10"))) is None   # not a chain
    mk = mkldnn_utils.to_mkldnn(net)
    x = torch.randn(70, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.equal(chain(x), mk(x.to_mkldnn()).to_dense())     # the same kernels: the same bits


# ----------------------------------------------------------------------------- the pool

def save_fake_api(prefix, dataset, arch, index, classes, way=5):
    spec = get_spec(dataset)
    folder = pool_dir(prefix, dataset, arch, way)
    os.makedirs(folder, exist_ok=True)
    m = network.build(arch, way, channels=spec.channels, image_size=spec.image_size)
    torch.save({"state_dict": m.state_dict(), "classes": list(classes), "arch": arch, "dataset": dataset,
                "image_size": spec.image_size, "channels": spec.channels, "way": way, "val_acc": 50.0,
                "index": index, "seed": 0, "epochs": 1}, os.path.join(folder, f"model_specific_{index}.pth"))


def test_pool_ss_uses_what_exists_and_says_so_once(tmp_path):
    prefix = str(tmp_path)
    for i in range(3):
        save_fake_api(prefix, "demo", "conv4", i, range(5 * i, 5 * i + 5))
    notes = []
    pool = APIPool.load(prefix, "demo", "conv4", 5, 100, DEVICE, say=notes.append)
    assert len(pool) == 3 and len(notes) == 1 and "--APInum 100" in notes[0] and "using those 3" in notes[0]
    rng = np.random.default_rng(0)
    drawn = {tuple(pool.draw(rng).classes) for _ in range(20)}
    assert drawn == {tuple(range(5 * i, 5 * i + 5)) for i in range(3)}
    assert pool.classes == list(range(15))
    api = pool.get("demo", "conv4", 1)
    api(torch.rand(4, 3, 32, 32, device=DEVICE)); pool.get("demo", "conv4", 2)(torch.rand(3, 3, 32, 32, device=DEVICE))
    assert api.queries == 4 and pool.queries == 7
    assert len(APIPool.load(prefix, "demo", "conv4", 5, 2, DEVICE, say=notes.append)) == 2 and len(notes) == 1


def test_pool_sh_and_mh_draw_rules(tmp_path):
    prefix = str(tmp_path)
    for arch in ("conv4", "resnet10", "resnet18"):
        save_fake_api(prefix, "demo", arch, 0, [1, 2, 3, 4, 5])
    sh = APIPool.load(prefix, "demo", "mix", 5, 1, DEVICE, cache_size=3)
    rng = np.random.default_rng(0)
    archs = [sh.draw(rng).arch for _ in range(30)]
    assert set(archs) == {"conv4", "resnet10", "resnet18"}

    raw = {"cifar100": [0, 10, 20, 30, 63], "miniimagenet": [0, 1, 2, 3, 63], "cub": [0, 5, 50, 98, 99]}
    for d, classes in raw.items():
        for arch in ("conv4", "resnet10", "resnet18"):
            save_fake_api(prefix, d, arch, 0, classes)
    mh = APIPool.load(prefix, "mix", "mix", 5, 1, DEVICE, cache_size=9)
    seen = set()
    for _ in range(30):
        api = mh.draw(rng)
        seen.add((api.spec.name, api.arch))
        lo = {"cifar100": 0, "miniimagenet": 64, "cub": 128}[api.spec.name]
        assert api.classes == [lo + c for c in raw[api.spec.name]]     # moved into the 228-class space
        assert api(torch.rand(2, 3, api.spec.image_size, api.spec.image_size, device=DEVICE)).shape == (2, 5)
    assert {d for d, _ in seen} == {"cifar100", "miniimagenet", "cub"} and len(seen) >= 7


def test_missing_pool_names_the_pretrain_command(tmp_path):
    prefix = str(tmp_path)
    save_fake_api(prefix, "demo", "conv4", 0, range(5))
    with pytest.raises(DataError) as e:
        APIPool.load(prefix, "demo", "mix", 5, 10, DEVICE, say=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg
    for arch in ("resnet10", "resnet18"):
        assert (f"python pretrain.py --dataset demo --pre_backbone {arch} --pretrained_path_prefix {prefix} "
                "--way_pretrain 5 --APInum 10") in msg
    assert "--pre_backbone conv4" not in msg


# ----------------------------------------------------------------------------- inversion

def target_acc(api, images, labels):
    norm = affine_normalizer(api.spec.mean, api.spec.std, api.spec.image_size, api.device)
    return 100.0 * int((api(norm(images)).argmax(1) == labels).sum()) / len(labels)     # exact: 18/20 is 90.0


# Bars: chance is 20% (5 classes); the untrained generator scores 15-30% (measured after one step).
# Measured on a demo pool like demo_pool (3 conv4 APIs, 4 images/class, 20 steps): white-box 100%
# and ZO (q=20) 100% on all three APIs. Replacing the estimate by a random vector gives 25-55% (the
# best-image selection alone does some random search) and negating it 20-35%; the bars sit between.
WHITE_BOX_BAR, ZO_BAR = 90.0, 80.0


def test_inversion_white_box_recovers_target_classes(demo_pool):
    pool = APIPool.load(demo_pool, "demo", "conv4", 5, 3, DEVICE, white_box=True)
    api = pool.get("demo", "conv4", 0)
    torch.manual_seed(0)
    stats = {}
    x, y = recover(api, 4, steps=20, zo=None, generator=torch.Generator(device=DEVICE).manual_seed(0), stats=stats)
    assert x.shape == (20, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [c for c in range(5) for _ in range(4)]
    assert api.queries == 20 * 20
    assert target_acc(api, x, y) >= WHITE_BOX_BAR
    assert stats["best_loss"] <= stats["final_loss"] + 1e-6


def test_inversion_zero_order_recovers_target_classes(demo_pool):
    pool = APIPool.load(demo_pool, "demo", "conv4", 5, 3, DEVICE)
    api = pool.get("demo", "conv4", 1)
    torch.manual_seed(0)
    x, y = recover(api, 4, steps=20, zo=ZOConfig(q=20, mu=0.005, numsplit=2),
                   generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert api.queries == 20 * 20 * (20 + 1)
    assert target_acc(api, x, y) >= ZO_BAR
    with pytest.raises(ValueError, match="white_box=True"):
        recover(api, 2, steps=1, zo=None)


@pytest.mark.parametrize("boundary_student", ["clean", "perturbed"])
def test_recover_leaves_a_students_graph_alone(boundary_student, device):
    api = BlackBoxAPI(random_model("conv4"), range(5), DEMO, "conv4", white_box=True, device=device)
    theta = (torch.randn(5, 3 * 32 * 32, device=device) * 0.01).requires_grad_()
    student = lambda x01: x01.flatten(1) @ theta.t()        # noqa: E731 (f_theta', part of a graph)
    recover(api, 2, steps=2, zo=None, student=student, adv=1.0, boundary_student=boundary_student)
    recover(BlackBoxAPI(random_model("conv4"), range(5), DEMO, "conv4", device=device), 2, steps=2,
            zo=ZOConfig(q=3, numsplit=2), student=student, adv=1.0, boundary_student=boundary_student)
    assert theta.grad is None


def test_cli_inverts_one_api_and_saves_a_grid(demo_pool, tmp_path):
    out = str(tmp_path / "grid.png")
    proc = run_cli(["-m", "synthesis", "--dataset", "demo", "--pre_backbone", "conv4", "--api", "2",
                    "--pretrained_path_prefix", demo_pool, "--ZO", "--q", "5", "--numsplit", "2",
                    "--generate_iterations", "3", "--num_per_class", "3", "--out", out, "--no_progress"])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res) == {"target_acc", "api_queries", "seconds"}
    assert res["api_queries"] == 3 * 15 * (5 + 1) and 0 <= res["target_acc"] <= 100
    from PIL import Image
    w, h = Image.open(out).size
    assert (w, h) == (3 * 34 + 2, 5 * 34 + 2)          # 3 images per row, one row per class
    bad = run_cli(["-m", "synthesis", "--dataset", "demo", "--pre_backbone", "resnet18", "--pretrained_path_prefix",
                   demo_pool, "--out", out], check=False)
    assert bad.returncode != 0 and "python pretrain.py --dataset demo --pre_backbone resnet18" in bad.stderr


# ----------------------------------------------------------------------------- task memory

def class_images(c: int, n: int, size: int = 32, batch: int = 0) -> torch.Tensor:
    """n images whose channel 0 encodes the class id and channel 1 the batch number (exact in 8 bits);
    made on the test device, as a visit's are (the memory keeps them on the CPU)."""
    x = torch.zeros(n, 3, size, size, device=DEVICE)
    x[:, 0] = c / 255.0
    x[:, 1] = batch / 255.0
    return x


def test_memory_samples_valid_tasks_across_syntheses():
    mem = TaskMemory(max_batch_per_class=20, image_size=32)
    for api_classes in ([3, 7, 9, 12, 40], [7, 9, 50, 51, 52], [3, 60, 61, 62, 63]):
        labels = torch.tensor(api_classes).repeat_interleave(6)
        mem.add(torch.cat([class_images(c, 6) for c in api_classes]), labels)
    assert mem.count(7) == 12 and mem.count(40) == 6
    rng = np.random.default_rng(0)
    pairs = set()
    for _ in range(30):
        t = mem.sample_task(5, 2, 3, rng)
        assert t.support_x.shape == (10, 3, 32, 32) and t.query_x.shape == (15, 3, 32, 32)
        assert t.support_y.tolist() == [k for k in range(5) for _ in range(2)]
        assert t.query_y.tolist() == [k for k in range(5) for _ in range(3)]
        assert len(set(t.classes.tolist())) == 5
        for x, y in ((t.support_x, t.support_y), (t.query_x, t.query_y)):
            ids = (x[:, 0, 0, 0] * 255).round().long()
            assert torch.equal(ids, torch.as_tensor(t.classes)[y])    # never an image under another label
        pairs.update((a, b) for a in t.classes for b in t.classes if a < b)
    assert (3, 50) in pairs or (12, 61) in pairs or len(pairs) > 20      # classes of different APIs meet


def test_memory_ring_buffer_skips_small_classes_and_never_crashes():
    mem = TaskMemory(max_batch_per_class=3, image_size=32)
    for b in range(5):
        mem.add(class_images(1, 4, batch=b), [1] * 4)
    assert mem.count(1) == 12
    t = mem.sample_task(1, 4, 8, np.random.default_rng(0))
    kept = set((torch.cat([t.support_x, t.query_x])[:, 1, 0, 0] * 255).round().long().tolist())
    assert kept == {2, 3, 4}                          # the two oldest syntheses were dropped
    mem.add(class_images(2, 2), [2, 2])               # too small for 1 + 2 images
    mem.add(class_images(3, 3), [3, 3, 3])
    assert not mem.can_sample(3, 1, 2) and mem.can_sample(2, 1, 2)
    for _ in range(10):
        assert set(mem.sample_task(2, 1, 2, np.random.default_rng(_)).classes.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="can_sample"):
        mem.sample_task(3, 1, 2, np.random.default_rng(0))
    assert not TaskMemory(20, 32).can_sample(5, 1, 15)


def test_memory_resizes_and_round_trips_its_state(tmp_path):
    mem = TaskMemory(max_batch_per_class=4, image_size=84)
    mem.add(torch.cat([class_images(c, 5) for c in (64, 130)]), [64] * 5 + [130] * 5)
    path = str(tmp_path / "mem.pth")
    torch.save(mem.state_dict(), path)
    again = TaskMemory(max_batch_per_class=4, image_size=84)
    again.load_state_dict(torch.load(path, weights_only=True))
    a = mem.sample_task(2, 2, 3, np.random.default_rng(5))
    b = again.sample_task(2, 2, 3, np.random.default_rng(5))
    assert a.support_x.shape[-1] == 84
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    with pytest.raises(CheckpointError, match="84px"):
        TaskMemory(4, image_size=32).load_state_dict(mem.state_dict())


def test_replay_flag_check():
    assert check_replay_flags(30, 30, 5, 15, 20) is None           # the original's defaults
    assert check_replay_flags(3, 3, 1, 5, 2) is None                 # the last two syntheses hold 3 + 3
    msg = check_replay_flags(3, 3, 1, 5, 1)                          # one synthesis of 3 < 1 + 5, ever
    assert msg and "at most 3" in msg and "--max_batch_per_class 1" in msg and "--num_sup_train 1" in msg
