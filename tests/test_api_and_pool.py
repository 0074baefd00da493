"""synthesis/api.py, synthesis/store.py and synthesis/pool.py: a black-box API answers probabilities and nothing
else, counts every query and enforces the budget; API files of the store; the pool's draw rules for API-SS,
SH and MH, its lazy loading and its query counts across resumes and processes."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import network
from core.errors import DataError, PoolError, QueryBudgetExceeded
from dataset.specs import get_spec
from synthesis import APIPool, BlackBoxAPI
from synthesis.api import QueryMeter, load_api
from synthesis.store import api_files, pool_dir, read_meta

from conftest import DEVICE
from helpers import DEMO, random_api, random_model

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

# ----------------------------------------------------------------------------- the black box


def test_black_box_returns_probabilities_without_autograd_history(device):
    api = random_api(classes=[3, 9, 11, 20, 40], device=device)
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
    assert (api.classes, api.way, api.arch) == ([3, 9, 11, 20, 40], 5, "conv4") and "black-box" in repr(api)


def test_an_api_answers_the_logits_its_probabilities_are_the_softmax_of_counted_alike(device):
    """The original's API is its network: it answers logits (--api_output logits, the faithful default)."""
    from synthesis.api import probabilities
    x = torch.randn(6, 3, 32, 32, device=device)
    p_api, z_api = random_api(device=device), random_api(device=device, output="logits")
    p, z = p_api(x), z_api(x)
    torch.testing.assert_close(F.softmax(z, 1), p, rtol=1e-5, atol=1e-6)
    assert not z.requires_grad and z_api.queries == p_api.queries == 6
    torch.testing.assert_close(probabilities(z_api, z), p, rtol=1e-5, atol=1e-6)
    assert probabilities(p_api, p) is p
    with pytest.raises(ValueError, match="logits"):
        random_api(output="scores")


def test_white_box_api_lets_gradients_reach_the_images_only(device):
    model = random_model()
    api = BlackBoxAPI(model, range(5), DEMO, "conv4", white_box=True, device=device)
    x = torch.randn(4, 3, 32, 32, device=device, requires_grad=True)
    api(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_queries_counted_and_budget_enforced(device):
    api = random_api(device=device, budget=10)
    api(torch.rand(6, 3, 32, 32, device=device))
    assert api.queries == 6 and api.budget == 10
    with pytest.raises(QueryBudgetExceeded) as e:
        api(torch.rand(5, 3, 32, 32, device=device))
    msg = str(e.value)
    assert "budget of 10" in msg and "\n" not in msg and isinstance(e.value, Exception)
    assert api.queries == 6                         # the refused call was not served
    api(torch.rand(4, 3, 32, 32, device=device))    # exactly up to the budget
    assert api.queries == 10
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        api(torch.rand(2, 3, 28, 28, device=device))


def test_query_meter_is_shared_and_counts_from_threads():
    meter = QueryMeter(budget=None)
    a = random_api(key="a", meter=meter, device="cpu")
    b = random_api(key="b", meter=meter, device="cpu", seed=1)
    x = torch.rand(3, 3, 32, 32)

    def many(api):
        for _ in range(20):
            api(x)
    threads = [threading.Thread(target=many, args=(api,)) for api in (a, b, a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (a.queries, b.queries, meter.total) == (120, 60, 180)
    assert meter.per_api == {"a": 120, "b": 60}


@pytest.mark.parametrize("arch", ["conv4", pytest.param("resnet10", marks=pytest.mark.slow)])
def test_fast_api_equals_the_plain_one(arch, device):
    """The API's default forward (batch-norm folded, oneDNN or channels-last, micro-batches) against its
    plain form (speed: none of those) and the eval model itself."""
    model = random_model(arch).to(device)
    x = torch.randn(70, 3, 32, 32, device=device)
    with torch.no_grad():
        ref = F.softmax(model(x), 1)
    fast = BlackBoxAPI(model, range(5), DEMO, arch, device=device, speed=dict(micro_batch=32))
    plain = BlackBoxAPI(model, range(5), DEMO, arch, device=device,
                        speed=dict(fold_bn=False, channels_last=False, micro_batch=None, mkldnn=False))
    torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())     # a copy was folded, not the model


# ----------------------------------------------------------------------------- API files and the pool

def save_fake_api(prefix, dataset, arch, index, classes, way=5, **extra):
    spec = get_spec(dataset)
    folder = pool_dir(prefix, dataset, arch, way)
    os.makedirs(folder, exist_ok=True)
    m = network.build(arch, way, channels=spec.channels, image_size=spec.image_size)
    path = os.path.join(folder, f"model_specific_{index}.pth")
    torch.save({"state_dict": m.state_dict(), "classes": list(classes), "arch": arch, "dataset": dataset,
                "image_size": spec.image_size, "channels": spec.channels, "way": way, "val_acc": 50.0,
                "index": index, "seed": 0, "epochs": 1, **extra}, path)
    return path, m


def test_api_files_read_and_load_as_black_boxes(tmp_path):
    prefix = str(tmp_path)
    path, model = save_fake_api(prefix, "demo", "conv4", 3, [7, 1, 4, 9, 2])
    save_fake_api(prefix, "demo", "conv4", 11, range(5))
    (tmp_path / "demo" / "conv4" / "meta_train" / "5way" / "model" / "model_specific_x.pth").write_bytes(b"")
    assert list(api_files(os.path.dirname(path))) == [3, 11]              # by index, foreign names ignored
    meta = read_meta(path, expect={"dataset": "demo", "arch": "conv4"})
    assert "state_dict" not in meta and meta["classes"] == [7, 1, 4, 9, 2]
    with pytest.raises(PoolError, match="holds arch 'conv4', expected 'resnet10'") as e:
        read_meta(path, expect={"arch": "resnet10"})
    assert "\n" not in str(e.value)
    api = load_api(path, DEVICE, label_offset=64)
    assert api.classes == [71, 65, 68, 73, 66] and api.key == "demo/conv4/3"
    x = torch.rand(4, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(api(x), F.softmax(model.eval().to(DEVICE)(x), 1), rtol=1e-4, atol=1e-5)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PoolError, match="delete it and rerun pretrain.py"):
        read_meta(str(tmp_path / "bad.pth"))


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
    with pytest.raises(PoolError, match="no API 7 for demo/conv4"):
        pool.get("demo", "conv4", 7)


def test_pool_picks_entries_without_loading_and_keeps_a_few_open(tmp_path):
    prefix = str(tmp_path)
    for i in range(4):
        save_fake_api(prefix, "demo", "conv4", i, range(i, i + 5))
    pool = APIPool.load(prefix, "demo", "conv4", 5, 4, DEVICE, cache_size=2, say=lambda m: None)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    picks = [pool.pick(rng_a) for _ in range(6)]
    assert pool.ready == []                                             # picking loads nothing
    assert [pool.draw(rng_b).classes for _ in range(6)] == [list(e.classes) for e in picks]   # same draws
    assert len(pool.ready) <= 2                                         # least recently used ones closed
    api = pool.open(picks[-1])
    assert pool.open(picks[-1]) is api and pool.ready[-1] == (picks[-1].dataset, picks[-1].arch, picks[-1].index)


def test_pool_queries_survive_resume_and_count_other_processes(tmp_path):
    prefix = str(tmp_path)
    for i in range(2):
        save_fake_api(prefix, "demo", "conv4", i, range(5))
    pool = APIPool.load(prefix, "demo", "conv4", 5, 2, DEVICE, budget=20, say=lambda m: None)
    pool.get("demo", "conv4", 0)(torch.rand(6, 3, 32, 32, device=DEVICE))
    pool.add_queries({"demo/conv4/1": 9})                               # another process's visit
    assert pool.queries == 15 and pool.get("demo", "conv4", 1).queries == 9
    again = APIPool.load(prefix, "demo", "conv4", 5, 2, DEVICE, budget=20, say=lambda m: None)
    again.load_state_dict(pool.state_dict())
    assert again.queries == 15 and again.get("demo", "conv4", 0).queries == 6
    with pytest.raises(QueryBudgetExceeded):                            # the budget spans the pool
        again.get("demo", "conv4", 1)(torch.rand(6, 3, 32, 32, device=DEVICE))


@pytest.mark.slow
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


def test_a_file_of_another_pool_is_refused(tmp_path):
    prefix = str(tmp_path)
    path, _ = save_fake_api(prefix, "demo", "conv4", 0, range(5))
    os.makedirs(pool_dir(prefix, "demo", "resnet10", 5))
    os.rename(path, os.path.join(pool_dir(prefix, "demo", "resnet10", 5), "model_specific_0.pth"))
    with pytest.raises(PoolError, match="holds arch 'conv4', expected 'resnet10'"):
        APIPool.load(prefix, "demo", "resnet10", 5, 1, DEVICE, say=lambda m: None)
