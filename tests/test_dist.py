"""Meta-training under torchrun (docs/distributed.md): two processes agree after every meta-step,
rank 0 alone writes, the results are those of one process, a killed process leaves a resumable run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, RUN_FLAGS, run_cli
from test_lean import _run_memory as _memory
from test_meta import _flags, _read_jsonl

from core.errors import FlagError
from synthesis.memory import BatchCounts, TaskMemory

REF = ("--episode_train", "24", "--val_interval", "8", "--save_interval", "8")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "main.py"]
# The threads torchrun gives each of 2 processes (core/device.py), for every compared run: a thread count
# changes the CPU's summation order. gloo on the CPU even on a GPU machine (two processes would need two
# GPUs), so the compared runs share a device.
SAME_THREADS = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)), "CUDA_VISIBLE_DEVICES": ""}


def _trace(folder: str) -> dict[int, list[dict]]:
    """BIDF_DIST_TRACE's files: {rank: [{pid, world}, {task, params, memory} per meta-step ...]}."""
    return {int(name[4:-6]): _read_jsonl(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def _model(out: str) -> dict:
    return torch.load(os.path.join(out, "last.pth"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(demo_root, demo_pool, tmp_path_factory):
    """The same tiny run in one process and over two (torchrun, gloo), both traced."""
    base = str(tmp_path_factory.mktemp("dist"))
    one, two = os.path.join(base, "one"), os.path.join(base, "two")
    run_cli(["main.py", *_flags(demo_root, demo_pool, one, *REF)],
            env_extra={**SAME_THREADS, "BIDF_DIST_TRACE": os.path.join(base, "trace_one")})
    proc = run_cli([*TORCHRUN, *_flags(demo_root, demo_pool, two, *REF)],
                   env_extra={**SAME_THREADS, "BIDF_DIST_TRACE": os.path.join(base, "trace_two")})
    return base, one, two, proc


def test_two_processes_hold_the_same_model_and_memory_after_every_meta_step(runs):
    base, _, _, _ = runs
    trace = _trace(os.path.join(base, "trace_two"))
    assert set(trace) == {0, 1}
    assert trace[0][0]["world"] == trace[1][0]["world"] == 2 and trace[0][0]["pid"] != trace[1][0]["pid"]
    steps = trace[0][1:]
    assert [r["task"] for r in steps] == [4, 8, 12, 16, 20, 24]
    assert steps == trace[1][1:]                                   # parameters and memory, step by step
    assert len({r["params"] for r in steps}) == len(steps)         # the model moved at every step


def test_rank0_alone_writes_the_outputs(runs):
    _, _, two, proc = runs
    summary = json.load(open(os.path.join(two, "summary.json")))
    assert summary["processes"] == 2 and summary["tasks"] == 24
    assert proc.stdout.count("done: meta_test") == 1               # one process reports
    rows = [(r["task"], r["split"]) for r in _read_jsonl(os.path.join(two, "metrics.jsonl"))]
    assert rows == [(t, s) for t in (8, 16, 24) for s in ("meta_val", "meta_test")]   # each written once
    assert len([f for f in os.listdir(os.path.join(two, "tb")) if f.startswith("events.out.tfevents")]) == 1


def test_two_processes_give_the_results_of_one(runs):
    base, one, two, _ = runs
    m1, m2 = _model(one), _model(two)
    for k in m1:
        assert torch.allclose(m1[k], m2[k], atol=1e-5, rtol=0), k
    def evals(out):
        return [(r["task"], r["split"], r["acc"], r["ci"]) for r in _read_jsonl(os.path.join(out, "metrics.jsonl"))]
    assert evals(one) == evals(two)                                    # the same 6 evaluation tasks, same accuracies
    s1, s2 = (json.load(open(os.path.join(o, "summary.json"))) for o in (one, two))
    for k in ("test_acc", "test_ci", "val_acc", "api_visits", "api_queries", "tasks"):
        assert s1[k] == s2[k], k
    assert _memory(one).equals(_memory(two))
    ref = _trace(os.path.join(base, "trace_one"))[0][1:]
    assert [r["memory"] for r in ref] == [r["memory"] for r in _trace(os.path.join(base, "trace_two"))[0][1:]]


def test_killed_process_stops_the_run_which_resumes_with_another_process_count(runs, demo_root, demo_pool, tmp_path):
    base, one, _, _ = runs
    out, trace = str(tmp_path / "killed"), str(tmp_path / "trace")
    flags = _flags(demo_root, demo_pool, out, *REF)
    env = dict(os.environ, PYTHONPATH=REPO, BIDF_DIST_TRACE=trace, **SAME_THREADS)
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, *TORCHRUN, *flags, *RUN_FLAGS], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        last = os.path.join(out, "last.pth")
        deadline = time.time() + 240
        while not os.path.exists(last) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(_trace(trace)[1][0]["pid"], signal.SIGKILL)        # rank 1
        proc.wait(timeout=120)
    assert proc.returncode != 0
    assert not os.path.exists(os.path.join(out, "summary.json")), "the run ended before it could be killed"
    stopped = [line for line in open(tmp_path / "stderr").read().replace("\r", "\n").splitlines()
               if "another process of the run ended" in line]
    assert len(stopped) == 1 and "add --resume" in stopped[0], stopped
    done = torch.load(last, weights_only=True)["state"]["task"]     # intact
    assert 8 <= done < 24

    res = run_cli(["main.py", *flags, "--resume"], env_extra=SAME_THREADS)      # one process now
    assert f"after task {done}" in res.stdout
    assert json.load(open(os.path.join(out, "summary.json")))["tasks"] == 24
    rows = _read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["task"] for r in rows if r["split"] == "meta_test"] == [8, 16, 24]
    ours, ref = _model(out), _model(one)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-5, rtol=0), k
    assert _memory(out).equals(_memory(one))


def test_replay_vmap_is_refused_under_torchrun(demo_root, demo_pool, tmp_path, monkeypatch):
    from main import parse_args
    from methods.meta_train import Trainer
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(FlagError, match="drop --replay_vmap") as e:
        Trainer(parse_args(_flags(demo_root, demo_pool, str(tmp_path / "r"), "--replay_vmap")))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "r")


def test_planned_counts_follow_the_memory():
    """plan() decides visits from BatchCounts: it must say what the memory itself would say."""
    mem, gen = TaskMemory(3, image_size=4), torch.Generator().manual_seed(0)
    counts = mem.counts()
    for step in range(12):
        classes = torch.randperm(9, generator=gen)[:4].tolist()
        for n in (2, 5):        # a visit: a support and a query set
            mem.add(torch.rand(4 * n, 3, 4, 4, generator=gen), torch.tensor(classes).repeat_interleave(n))
        counts.add(classes, 2, 5)
        for way, shot, query in ((2, 1, 1), (4, 3, 4), (5, 6, 6), (8, 1, 6), (9, 2, 2)):
            assert counts.can_sample(way, shot, query) == mem.can_sample(way, shot, query), (step, way, shot, query)
        fresh = mem.counts()    # and a plan made from the memory as it is now agrees too
        assert all(fresh.can_sample(w, 1, q) == mem.can_sample(w, 1, q) for w in range(1, 10) for q in range(1, 12))
    assert isinstance(counts, BatchCounts)


def test_task_grads_add_rows_in_task_order_like_accumulated_backwards():
    from core.dist import Dist
    from methods.meta_train import TaskGrads
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    xs = [torch.randn(7, 5) for _ in range(4)]
    for x in xs:                                    # one process accumulating the tasks' backwards
        model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    grads = TaskGrads(list(model.parameters()), 4)
    for i in (2, 0, 3, 1):                          # tasks run in any order, as on several processes
        model(xs[i]).square().sum().backward()
        grads.take(i)
    grads.reduce(Dist())
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))


def test_evaluate_over_two_processes_scores_the_same_tasks(runs, demo_root, tmp_path):
    _, one, _, _ = runs
    flags = ["--dataset", "demo", "--data_root", demo_root, "--evaluate", os.path.join(one, "best.pth"),
             "--way_train", "10", "--num_sup_test", "1", "--num_qur_test", "3", "--episode_test", "9",
             "--test_inner_update_num", "3"]
    run_cli(["main.py", *flags, "--out_dir", str(tmp_path / "e1")], env_extra=SAME_THREADS)
    proc = run_cli([*TORCHRUN, *flags, "--out_dir", str(tmp_path / "e2")], env_extra=SAME_THREADS)
    s1, s2 = (json.load(open(tmp_path / e / "summary.json")) for e in ("e1", "e2"))
    assert (s1["test_acc"], s1["test_ci"]) == (s2["test_acc"], s2["test_ci"])     # 9 tasks: 5 on rank 0, 4 on rank 1
    assert proc.stdout.count("done:") == 1
