"""A lean API visit (the inner loop's graph rebuilt step by step in the outer backward) and the task
memory's append-only checkpoint files: same numbers as before, less memory, smaller saves."""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import DEVICE, ON_CPU, REPO, device_tol, kill_after_first_save, run_cli

from core.errors import CheckpointError
from synthesis.memory import TaskMemory, batch_file

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
    exact = ON_CPU                      # CUDA kernels may sum in another order from run to run
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
    assert mem_full.equals(mem_lean)


def test_lean_visit_first_order_and_no_inner_step_are_unchanged():
    for kw in ({"approx": True}, {"steps": 0}):
        full, g_full, _, _ = _visit(False, **kw)
        lean, g_lean, _, _ = _visit(True, **kw)
        if ON_CPU:
            assert torch.equal(full.loss.detach(), lean.loss.detach())
        else:       # CUDA kernels may sum in another order from run to run (the recovered images too)
            assert torch.allclose(full.loss.detach(), lean.loss.detach(), rtol=1e-4, atol=1e-6)
        rtol, atol = device_tol(1e-6, 1e-4), device_tol(1e-8, 1e-6)
        assert all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(g_full, g_lean))


def test_lean_inner_loop_matches_finite_differences(device):
    """The meta-gradient of lean_adapt against central differences of the outer loss (float64)."""
    from methods.kd import lean_adapt
    from methods.maml import adapt, forward, kl_loss, meta_params
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()
    xs, xq = torch.randn(7, 3, dtype=torch.double), torch.randn(6, 3, dtype=torch.double)
    ps = torch.softmax(torch.randn(7, 4, dtype=torch.double), 1)
    pq = torch.softmax(torch.randn(6, 4, dtype=torch.double), 1)
    model, xs, xq, ps, pq = (t.to(device) for t in (model, xs, xq, ps, pq))     # drawn on the CPU: same values
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
                       for e in torch.eye(len(flat), dtype=torch.double, device=device)], dtype=torch.double)
    assert torch.allclose(grad.cpu(), fd, atol=1e-7, rtol=1e-5)


def test_student_sees_at_most_one_recovered_set_per_forward(device):
    from methods.kd import bounded_student
    seen = []
    student = bounded_student(lambda x: (seen.append(x.shape[0]), x.sum((1, 2, 3))[:, None])[1], 15)
    x = torch.rand(40, 3, 4, 4, device=device)
    assert torch.equal(student(x), x.sum((1, 2, 3))[:, None])
    assert seen == [15, 15, 10]


# ------------------------------------------------------------------ the task memory on disk


def _visit_images(mem: TaskMemory, rng: np.random.Generator, classes, per_class: int) -> None:
    """What one visit adds: a support and a query set of `per_class` images for each of 5 classes."""
    for _ in range(2):
        labels = np.repeat(classes, per_class)
        mem.add(torch.from_numpy(rng.random((len(labels), 3, 32, 32), dtype=np.float32)), torch.from_numpy(labels))


def _mh_memory(visits: int, max_batch: int = 6, seed: int = 0) -> tuple[TaskMemory, np.random.Generator]:
    """An API-MH-shaped memory (84x84, classes of the three datasets' 228-class space), small."""
    rng = np.random.default_rng(seed)
    mem = TaskMemory(max_batch, image_size=84)
    for _ in range(visits):
        _visit_images(mem, rng, rng.choice(228, size=5, replace=False), 6)
    return mem, rng


def _files(folder: str) -> set[str]:
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def test_memory_files_round_trip_and_a_save_writes_only_the_new_visit(tmp_path):
    folder = str(tmp_path / "memory")
    mem, rng = _mh_memory(40)
    index = mem.save(folder, preview=0)
    TaskMemory.prune(folder, index)
    assert mem.bytes_written > mem.nbytes()                 # the first save writes everything
    again = TaskMemory(6, image_size=84)
    again.load(index, folder)
    assert again.equals(mem) and len(again) == len(mem)
    a, b = (m.sample_task(5, 2, 3, np.random.default_rng(1)) for m in (mem, again))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)

    _visit_images(mem, rng, [3, 70, 130, 200, 227], 6)       # one more visit, then a save
    visit_bytes = 2 * 5 * 6 * 3 * 84 * 84
    index = mem.save(folder, preview=0)
    assert mem.bytes_written < 1.2 * visit_bytes + 8192      # that visit (and file headers), nothing else
    assert mem.bytes_written < 0.05 * mem.nbytes()
    assert mem.save(folder, preview=0) == index and mem.bytes_written == 0      # nothing new: nothing written
    size = os.path.getsize
    torch.save(index, str(tmp_path / "index.pth"))
    assert size(str(tmp_path / "index.pth")) < 0.01 * mem.nbytes()              # the index is small
    TaskMemory.prune(folder, index)
    again = TaskMemory(6, image_size=84)
    again.load(index, folder)
    assert again.equals(mem)


def test_memory_files_of_evicted_batches_are_pruned_after_the_commit(tmp_path):
    folder = str(tmp_path / "memory")
    mem = TaskMemory(2, image_size=32)
    rng = np.random.default_rng(0)
    for _ in range(3):
        _visit_images(mem, rng, [0, 1, 2, 3, 4], 2)
        index = mem.save(folder)
        assert len(_files(folder)) >= 2
        TaskMemory.prune(folder, index)
        assert _files(folder) == {batch_file(b) for ids in index["batches"].values() for b in ids}
    assert len(_files(folder)) == 2                          # the ring buffer holds the last 2 sets per class
    assert set(index["store"]) == set(mem.classes)           # the preview for readers of last.pth
    assert torch.equal(index["store"][0][0], torch.cat(mem.batches(0))[:8])


def test_memory_after_a_kill_between_its_files_and_the_checkpoint(tmp_path):
    """Files written after the last committed index are ignored, then overwritten."""
    folder = str(tmp_path / "memory")
    mem, rng = _mh_memory(10)
    committed = mem.save(folder, preview=0)
    TaskMemory.prune(folder, committed)
    snapshot = TaskMemory(6, 84)
    snapshot.load(committed, folder)
    _visit_images(mem, rng, [1, 2, 3, 4, 5], 6)
    mem.save(folder, preview=0)                              # files of the visit written; killed before last.pth
    new_ids = set(_files(folder)) - {batch_file(b) for ids in committed["batches"].values() for b in ids}
    assert new_ids
    with open(os.path.join(folder, sorted(new_ids)[0]) + ".tmp123", "wb") as f:
        f.write(b"torn")                                     # and a torn temporary of the next file

    resumed = TaskMemory(6, 84)
    resumed.load(committed, folder)
    assert resumed.equals(snapshot)
    _visit_images(resumed, np.random.default_rng(99), [1, 2, 3, 4, 5], 6)   # the repeated visit differs
    index = resumed.save(folder, preview=0)
    TaskMemory.prune(folder, index)
    check = TaskMemory(6, 84)
    check.load(index, folder)
    assert check.equals(resumed) and not check.equals(mem)
    assert not any(".tmp" in n for n in _files(folder))


def test_memory_checkpoint_of_earlier_versions_still_loads(tmp_path):
    mem, _ = _mh_memory(5)
    old = mem.state_dict()                                    # images inside the checkpoint
    again = TaskMemory(6, 84)
    again.load_state_dict(old, folder=str(tmp_path / "memory"))
    assert again.equals(mem)
    index = again.save(str(tmp_path / "memory"), preview=0)  # the first save writes every batch
    assert again.bytes_written > mem.nbytes()
    check = TaskMemory(6, 84)
    check.load_state_dict(index, folder=str(tmp_path / "memory"))
    assert check.equals(mem)


def test_missing_memory_file_is_one_clear_line(tmp_path):
    folder = str(tmp_path / "memory")
    mem, _ = _mh_memory(2)
    index = mem.save(folder, preview=0)
    os.remove(os.path.join(folder, batch_file(0)))
    with pytest.raises(CheckpointError, match="missing") as e:
        TaskMemory(6, 84).load(index, folder)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ main.py: kill -9 and resume


def _run_memory(out: str) -> TaskMemory:
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    mem = TaskMemory(ck["memory"]["max_batch_per_class"], ck["memory"]["image_size"])
    mem.load_state_dict(ck["memory"], folder=os.path.join(out, "memory"))
    return mem


@pytest.fixture(scope="module")
def reference_run(demo_root, demo_pool, tmp_path_factory):
    from test_meta import _flags
    out = str(tmp_path_factory.mktemp("lean") / "ref")
    flags = _flags(demo_root, demo_pool, out, "--episode_train", "16", "--val_interval", "8", "--save_interval", "4")
    run_cli(["main.py", *flags])
    return out, flags


@pytest.mark.parametrize("case", ["orphan_files", "checkpoint_of_earlier_versions"])
def test_killed_run_resumes_with_the_same_memory(reference_run, tmp_path, case):
    ref_out, ref_flags = reference_run
    out = str(tmp_path / "killed")
    i = ref_flags.index("--out_dir") + 1
    flags = [*ref_flags[:i], out, *ref_flags[i + 1:]]
    kill_after_first_save(flags, out)
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    at_kill = _run_memory(out)
    assert "batches" in ck["memory"] and len(at_kill) > 0
    folder = os.path.join(out, "memory")
    if case == "orphan_files":      # as if killed after writing the next save's files, before its last.pth
        with open(os.path.join(folder, batch_file(ck["memory"]["next_id"])), "wb") as f:
            f.write(b"not this run's file")
    else:                           # last.pth as the code before the memory files wrote it
        ck["memory"] = at_kill.state_dict()
        torch.save(ck, os.path.join(out, "last.pth"))
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    run_cli(["main.py", *flags, "--resume"])
    assert _run_memory(out).equals(_run_memory(ref_out))
    ref = torch.load(os.path.join(ref_out, "last.pth"), weights_only=True)
    ours = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(ours["model"].values(), ref["model"].values()))
    named = {batch_file(b) for ids in ours["memory"]["batches"].values() for b in ids}
    assert _files(folder) == named                                        # the orphan is gone
    if case == "orphan_files":      # the same batches under the same names
        assert ours["memory"]["batches"] == ref["memory"]["batches"]
        assert _files(folder) == _files(os.path.join(ref_out, "memory"))


def test_last_pth_keeps_what_reporting_reads(reference_run, tmp_path):
    """python -m reporting draws recovered images from last.pth: the first images of each class."""
    from reporting.figures import recovered_vs_real
    out, _ = reference_run
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    mem = _run_memory(out)
    assert set(ck["memory"]["store"]) == set(mem.classes)
    for c in mem.classes:
        assert torch.equal(torch.cat(list(ck["memory"]["store"][c]))[:6], torch.cat(mem.batches(c))[:6])
    assert recovered_vs_real(out, str(tmp_path / "recovered.png"))
    assert os.path.getsize(tmp_path / "recovered.png") > 1000


# ------------------------------------------------------------------ bench: the cost estimate and the GPU check


def test_visit_count_assumptions():
    from bench.estimate import count_evaluations, count_saves, count_visits
    from main import parse_args
    demo = parse_args(["--preset", "demo"])
    assert count_visits(demo, "bound")[0] == 20            # 100 meta-batches, at most one visit per 5
    assert count_visits(demo, "demo")[0] == 9               # what the demo run showed
    assert count_visits(demo, "7") == (7, "given (--visits)")
    capped, why = count_visits(parse_args(["--preset", "demo", "--query_budget", "300000"]), "bound")
    assert capped == 3 and "--query_budget" in why        # 84,100 queries a visit
    paper = parse_args(["--preset", "paper_ss"])
    assert count_visits(paper, "bound")[0] == 1 + (60000 - 1) // 201
    assert count_evaluations(demo) == 4 and count_saves(paper) == 120


def test_estimate_prints_a_projection_and_json_last():
    proc = run_cli(["-m", "bench", "--estimate", "--quick", "--", "--preset", "demo", "--generate_iterations", "3",
                    "--q", "2", "--num_sup_kd", "2", "--num_qur_kd", "2", "--episode_test", "10"])
    import json
    lines = proc.stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert {"wall_hours", "peak_mem_gb", "disk_gb", "api_visits"} <= set(doc)
    assert doc["wall_hours"] > 0 and doc["peak_mem_gb"] > 0 and doc["disk_gb"] > 0 and doc["api_visits"] == 20
    assert set(doc["hours_by_stage"]) == {"API visits", "replay", "evaluation", "checkpoints"}
    text = proc.stdout
    assert "measured" in text and "extrapolated" in text and "bound" in text


def test_estimate_projects_the_vmapped_paths_the_flags_ask_for(tmp_path):
    """--replay_vmap and --eval_chunk N: the projection uses the vmapped meta-batch and the vmapped
    chunk of N tasks it measured, not the one-task paths."""
    import json
    out = str(tmp_path / "estimate.json")
    run_cli(["-m", "bench", "--estimate", "--quick", "--out", out, "--", "--preset", "demo", "--generate_iterations",
             "2", "--q", "2", "--num_sup_kd", "2", "--num_qur_kd", "2", "--episode_test", "10",
             "--replay_vmap", "--eval_chunk", "3"])
    doc = json.load(open(out))
    stages = {s["stage"]: s for s in doc["stages"]}
    replay, ev = doc["measured"]["replay_batch"], doc["measured"]["eval_task"]
    assert stages["replay"]["each_s"] == pytest.approx(replay["vmap"]["seconds"] / 4)
    assert stages["evaluation"]["each_s"] == pytest.approx(ev["vmap_chunks"]["3"]["vmap_seconds_per_task"])
    assert "vmapped" in stages["replay"]["basis"] and "chunks of 3" in stages["evaluation"]["basis"]


def test_gpu_check_dry_run_lists_and_parses_its_commands(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "gpu"))
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    steps = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[gpu_check] ") and ">" in line]
    assert steps == ["[gpu_check] tests", "[gpu_check] bench", "[gpu_check] visit", "[gpu_check] estimate",
                     "[gpu_check] estimate_vmap"]
    assert "BIDF_TEST_DEVICE=cuda bash tests/run.sh" in proc.stdout and "--kd_steps 200" in proc.stdout
    assert not os.path.exists(tmp_path / "gpu")             # a dry run writes nothing
