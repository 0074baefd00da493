"""Meta-training: functional MAML gradients, the bi-level KD task, main.py end to end, resume,
flag checks, the never-overwrite rule and the baselines."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from conftest import kill_after_first_save, run_cli

from core.errors import BidfError, PoolError, RunDirError
from methods.maml import adapt, ce_loss, forward, kl_loss, meta_params

# ------------------------------------------------------------------ functional MAML


@pytest.fixture
def tiny_task(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    xs, ys = torch.randn(6, 3, dtype=torch.double), torch.tensor([0, 1, 2, 0, 1, 2])
    xq, yq = torch.randn(9, 3, dtype=torch.double), torch.tensor([0, 1, 2] * 3)
    return tuple(t.to(device) for t in (model, xs, ys, xq, yq))     # drawn on the CPU: the same values anywhere


def _outer(model, params, task, first_order=False, differentiable=True):
    _, xs, ys, xq, yq = task
    adapted = adapt(model, params, xs, ys, ce_loss, 3, 0.5, first_order, differentiable=differentiable)
    return ce_loss(forward(model, adapted, xq), yq), adapted


def test_second_order_meta_gradient_matches_finite_differences(tiny_task, device):
    model = tiny_task[0]
    params = meta_params(model)
    grad = torch.autograd.grad(_outer(model, params, tiny_task)[0], list(params.values()))
    grad = torch.cat([g.flatten() for g in grad])

    flat = torch.cat([v.detach().flatten() for v in params.values()])

    def f(vec):     # the outer loss as a function of θ, evaluated without any graph
        d, i = {}, 0
        for k, v in params.items():
            d[k] = vec[i:i + v.numel()].view_as(v)
            i += v.numel()
        return _outer(model, d, tiny_task, differentiable=False)[0].item()

    eps = 1e-6
    fd = torch.tensor([(f(flat + eps * e) - f(flat - eps * e)) / (2 * eps)
                       for e in torch.eye(len(flat), dtype=torch.double, device=device)], dtype=torch.double)
    assert fd.abs().max() > 1e-3                     # a real gradient, not zeros
    grad = grad.cpu()
    assert torch.allclose(grad, fd, atol=1e-7, rtol=1e-6), (grad - fd).abs().max()


def test_first_order_drops_the_second_order_term(tiny_task):
    model = tiny_task[0]
    params = meta_params(model)
    g2 = torch.cat([g.flatten() for g in torch.autograd.grad(_outer(model, params, tiny_task)[0],
                                                             list(params.values()))])
    loss1, adapted = _outer(model, params, tiny_task, first_order=True)
    g1 = torch.cat([g.flatten() for g in torch.autograd.grad(loss1, list(params.values()))])
    # first order: the meta-gradient is the query-loss gradient taken at θ' (dθ'/dθ = I)
    at = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    _, _, _, xq, yq = tiny_task
    g_at = torch.cat([g.flatten() for g in torch.autograd.grad(ce_loss(forward(model, at, xq), yq),
                                                               list(at.values()))])
    assert torch.allclose(g1, g_at, atol=1e-12)
    assert (g1 - g2).norm() > 0.05 * g2.norm()       # the dropped Hessian term is not negligible here


def test_test_time_adaptation_builds_no_graph(tiny_task):
    model, xs, ys, _, _ = tiny_task
    adapted = adapt(model, meta_params(model), xs, ys, ce_loss, 2, 0.5, differentiable=False)
    assert all(v.grad_fn is None and not v.requires_grad for v in adapted.values())


def test_kl_loss_is_a_proper_kl(device):
    torch.manual_seed(0)
    logits, other = torch.randn(7, 5, device=device), torch.randn(7, 5, device=device)
    p = torch.softmax(other, 1)
    want = (p * (p.log() - torch.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(kl_loss(logits, p), want, atol=1e-6)
    assert kl_loss(other, p).abs() < 1e-6


# ------------------------------------------------------------------ bi-level KD


def test_kd_task_inner_loop_fits_the_api_on_the_support_set(demo_pool, device, monkeypatch):
    from dataset import get_spec
    from core.config import Config, visit_cost
    import methods.kd as kd
    from methods.kd import KDSettings, kd_task
    from methods.meta_train import MetaInput
    from network import build
    from synthesis import APIPool, TaskMemory, ZOConfig
    from synthesis.zo import LANES

    spec = get_spec("demo")
    prep = MetaInput(spec.image_size, spec.channels, spec.mean, spec.std)
    torch.manual_seed(0)
    pool = APIPool.load(demo_pool, "demo", "conv4", 5, 3, device)
    api = pool.draw(np.random.default_rng(0))
    model = build("conv4", 5, image_size=32, batch_stats=True).to(device)
    memory = TaskMemory(20, 32)
    # The inner loop's own objective: the KL to the API on the recovered support set. (The query-set KL
    # after adaptation is no test: from one visit to a weak API it went up as often as down.)
    fit = []
    real_adapt = kd.lean_adapt

    def adapt_and_measure(model, params, x, p, steps, lr, way):
        adapted = real_adapt(model, params, x, p, steps, lr, way)
        with torch.no_grad():
            fit.append([kd.kl_loss(kd.forward(model, w, x, way), p).item() for w in (params, adapted)])
        return adapted
    monkeypatch.setattr(kd, "lean_adapt", adapt_and_measure)
    s = KDSettings(num_sup_kd=4, num_qur_kd=4, inner_update_num_kd=10, inner_lr=0.01, generate_iterations=3,
                   zo=ZOConfig(q=4, mu=0.005, numsplit=2), adv=1.0, visit_threads=3)
    seen = set()

    class ThreadsSeen:      # the API, noting the torch threads each query runs with
        def __getattr__(self, name):
            return getattr(api, name)

        def __call__(self, x):
            seen.add(torch.get_num_threads())
            return api(x)
    torch.set_num_threads(1)
    try:
        out = kd_task(model, meta_params(model), ThreadsSeen(), s, prep, boundary=True, memory=memory,
                      generator=torch.Generator(device=device).manual_seed(0))
        # --visit_threads during the visit only: 3 in the main thread, 3 // LANES in each ZO lane
        assert seen == {3, 3 // LANES} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    (before, after), = fit
    assert after < 0.5 * before                               # θ' fits the API on the support set
    assert 0.0 < out.api_confidence <= 1.0                    # a probability, from the queries already made
    out.loss.backward()                                       # the outer loss reaches every meta parameter
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert memory.classes == sorted(api.classes) and len(memory) == 5 * (4 + 4)
    cfg = Config(ZO=True, q=4, generate_iterations=3, num_sup_kd=4, num_qur_kd=4)
    assert pool.queries == visit_cost(cfg)                    # the budget check's count is exact


# ------------------------------------------------------------------ main.py end to end

TINY = ["--dataset", "demo", "--APInum", "3", "--ZO", "--q", "4", "--numsplit", "2", "--generate_iterations", "3",
        "--num_sup_kd", "2", "--num_qur_kd", "3", "--inner_update_num_kd", "3", "--way_train", "10",
        "--num_sup_train", "1", "--num_qur_train", "2", "--inner_update_num", "2", "--generate_interval", "2",
        "--way_test", "5", "--num_sup_test", "1", "--num_qur_test", "3", "--episode_test", "6",
        "--test_inner_update_num", "3", "--max_batch_per_class", "4", "--advstartit", "1"]


def _flags(demo_root, demo_pool, out_dir, *extra):
    return [*TINY, "--data_root", demo_root, "--pretrained_path_prefix", demo_pool, "--out_dir", out_dir, *extra]


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(demo_root, demo_pool, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    proc = run_cli(["main.py", *_flags(demo_root, demo_pool, out, "--episode_train", "16", "--val_interval", "8",
                                       "--save_interval", "8")])
    return out, proc


def test_tiny_run_writes_every_output(tiny_run):
    out, proc = tiny_run
    for name in ("config.json", "metrics.jsonl", "best.pth", "last.pth", "summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["tasks"] == 16 and summary["api_visits"] >= 2        # 10-way replay needs 2+ APIs
    assert summary["api_queries"] == summary["api_visits"] * 5 * 5 * (3 * 5 + 1)
    for k in ("test_acc", "test_ci", "val_acc", "wall_seconds", "test_acc_best_on_test (original protocol)"):
        assert k in summary
    assert 0 <= summary["test_acc"] <= 100 and summary["test_ci"] > 0
    rows = _read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [(r["task"], r["split"]) for r in rows] == [(8, "meta_val"), (8, "meta_test"),
                                                        (16, "meta_val"), (16, "meta_test")]
    for r in rows:
        assert {"task", "meta_iter", "split", "acc", "ci", "api_queries", "api_visits", "wall_seconds"} <= set(r)
    best = max((r for r in rows if r["split"] == "meta_val"), key=lambda r: r["acc"])
    test_of_best = [r["acc"] for r in rows if r["split"] == "meta_test" and r["task"] == best["task"]][0]
    assert summary["test_acc"] == pytest.approx(test_of_best, abs=1e-3)  # chosen on meta_val
    assert proc.stdout.count("meta_val") >= 2                             # a printed line per evaluation
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert ck["state"]["task"] == 16 and "memory" in ck and "optimizer" in ck


def test_existing_run_dir_is_never_overwritten(tiny_run, demo_root, demo_pool):
    from main import parse_args
    from methods.meta_train import train
    out, _ = tiny_run
    before = open(os.path.join(out, "summary.json")).read()
    base = _flags(demo_root, demo_pool, out, "--episode_train", "16", "--val_interval", "8", "--save_interval", "8")
    with pytest.raises(RunDirError, match="holds a finished run.*--overwrite"):
        train(parse_args(base))
    with pytest.raises(RunDirError, match="other flags.*--inner_lr"):
        train(parse_args([*base, "--inner_lr", "0.02"]))
    assert train(parse_args([*base, "--resume"]))["tasks"] == 16          # finished: nothing to do
    assert open(os.path.join(out, "summary.json")).read() == before


def test_resume_after_kill_continues_to_the_same_task_count(demo_root, demo_pool, tmp_path):
    out = str(tmp_path / "killed")
    flags = _flags(demo_root, demo_pool, out, "--episode_train", "24", "--val_interval", "4", "--save_interval", "4")
    kill_after_first_save(flags, out)
    last = os.path.join(out, "last.pth")
    done = torch.load(last, weights_only=True)["state"]["task"]
    assert 4 <= done < 24

    with pytest.raises(AssertionError, match="unfinished run"):           # no silent restart
        run_cli(["main.py", *flags])
    res = run_cli(["main.py", *flags, "--resume"])
    assert f"after task {done}" in res.stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["tasks"] == 24 and summary["tasks_run"] == 24
    tests = [r["task"] for r in _read_jsonl(os.path.join(out, "metrics.jsonl")) if r["split"] == "meta_test"]
    assert tests == [4, 8, 12, 16, 20, 24]                                 # every evaluation once


# ------------------------------------------------------------------ flags and baselines


@pytest.mark.parametrize("extra, message", [
    (["--episode_batch", "0"], "--episode_batch must be at least 1"),
    (["--way_test", "12"], "--way_test 12 exceeds --way_train 10"),
    (["--way_train", "70"], "--way_train 70 exceeds the 64 meta-train classes"),
    (["--way_train", "20", "--way_test", "17"], "--way_test 17 exceeds the 16 classes of demo/meta_val"),
    (["--num_sup_test", "50", "--num_qur_test", "15"], "--num_sup_test 50 \\+ --num_qur_test 15"),
    (["--way_train", "16"], "--way_train 16 exceeds the 1[0-5] classes the API pool covers"),
    (["--num_qur_train", "40"], "memory replay needs 41 images per class"),
    (["--query_budget", "100"], "--query_budget 100 does not cover one API visit"),
    (["--resume", "--overwrite"], "contradict"),
    (["--eval_lanes", "2", "--eval_chunk", "4"], "--eval_lanes 2 and --eval_chunk 4: pass one"),
])
def test_bad_flags_fail_fast_with_one_line(extra, message, demo_root, demo_pool, tmp_path):
    from main import main
    out = str(tmp_path / "bad")
    with pytest.raises(BidfError, match=message) as e:
        main(_flags(demo_root, demo_pool, out, *extra))
    assert "\n" not in str(e.value)
    assert not os.path.exists(os.path.join(out, "config.json"))           # nothing written


def test_bad_flag_on_the_command_line_is_one_line(demo_root, demo_pool, tmp_path):
    proc = run_cli(["main.py", *_flags(demo_root, demo_pool, str(tmp_path / "x"), "--way_train", "70")], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --way_train 70")


def test_missing_pool_names_the_pretrain_command(demo_root, tmp_path):
    from main import main
    with pytest.raises(PoolError, match="pretrain.py"):
        main(_flags(demo_root, str(tmp_path / "nopool"), str(tmp_path / "r")))


def test_baselines_run(demo_root, tmp_path):
    from main import parse_args
    from methods.meta_train import train
    common = ["--dataset", "demo", "--data_root", demo_root, "--num_sup_test", "1", "--num_qur_test", "3",
              "--episode_test", "6", "--test_inner_update_num", "3"]
    s = train(parse_args([*common, "--baseline", "random_init", "--out_dir", str(tmp_path / "r")]))
    assert s["tasks_run"] == 0 and 0 <= s["test_acc"] <= 100 and s["api_queries"] == 0
    assert os.path.isfile(tmp_path / "r" / "best.pth")
    s = train(parse_args([*common, "--baseline", "maml_real", "--episode_train", "4", "--val_interval", "4",
                          "--num_sup_train", "1", "--num_qur_train", "2", "--inner_update_num", "1",
                          "--out_dir", str(tmp_path / "m")]))
    assert s["tasks"] == 4 and s["api_visits"] == 0


def test_corrupt_checkpoint_is_one_line_and_kept(tiny_run, demo_root, demo_pool, tmp_path):
    out = str(tmp_path / "corrupt")
    shutil.copytree(tiny_run[0], out)
    os.remove(os.path.join(out, "summary.json"))                  # an unfinished run
    with open(os.path.join(out, "last.pth"), "r+b") as f:
        f.truncate(1000)                                          # as after a disk full
    proc = run_cli(["main.py", *_flags(demo_root, demo_pool, out, "--episode_train", "16", "--val_interval", "8",
                                       "--save_interval", "8", "--resume")], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "cannot read the run checkpoint" in lines[0]
    assert os.path.getsize(os.path.join(out, "last.pth")) == 1000      # nothing overwritten


def test_class_diversity_is_zero_for_a_collapsed_class_and_grows_with_spread(device):
    from methods.kd import class_diversity
    same = torch.full((4, 3, 8, 8), 0.5, device=device)
    spread = torch.rand(4, 3, 8, 8, device=device, generator=torch.Generator(device=device).manual_seed(0))
    div = class_diversity(torch.cat([same, spread]), torch.tensor([0] * 4 + [1] * 4, device=device))
    assert div[0] == pytest.approx(0.0, abs=1e-6) and div[1] > 0.3      # uniform pixels: RMS gap ~0.41
