"""Meta-training under torchrun (docs/distributed.md; core/dist.py, methods/meta_gradient.py): two processes hold
the same parameters and task memory after every meta-step (traced from outside the library by
tests/helpers_traced_main.py), rank 0 alone writes, the results are those of one process, a killed process
stops the run with one line and --resume (in one process) finishes it with the results of an uninterrupted
run; the meta-gradient is the same whichever process ran which task; core/dist.py without torchrun."""
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
from core import dist
from core.errors import FlagError
from helpers import flags, read_jsonl, run_memory
from helpers_traced_main import memory_digest

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

REF = ("--episode_train", "16", "--val_interval", "8", "--save_interval", "8")
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TRACED = os.path.join("tests", "helpers_traced_main.py")
# The threads torchrun gives each of 2 processes (core/device.py), for every compared run: a thread count
# changes the CPU's summation order. gloo on the CPU even on a GPU machine (two processes would need two
# GPUs), so the compared runs share a device.
SAME_THREADS = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)), "CUDA_VISIBLE_DEVICES": ""}


def _traced(argv: list[str], trace: str, processes: int = 1) -> subprocess.CompletedProcess:
    """main.py <argv> through the tracer, in one process or under torchrun."""
    launch = [*TORCHRUN, TRACED] if processes > 1 else [TRACED]
    return run_cli([*launch, *argv, *RUN_FLAGS], env_extra={**SAME_THREADS, "BIDF_TEST_TRACE": trace})


def _trace(folder: str) -> dict[int, list[dict]]:
    """{rank: [{pid, world}, {task, params, memory} per meta-step ...]}."""
    return {int(name[4:-6]): read_jsonl(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def _model(out: str) -> dict:
    return torch.load(os.path.join(out, "last.pth"), weights_only=True)["model"]


@pytest.fixture(scope="module")
def runs(demo_root, demo_pool, tmp_path_factory):
    """The same tiny run in one process and over two (torchrun, gloo), both traced."""
    base = str(tmp_path_factory.mktemp("dist"))
    one, two = os.path.join(base, "one"), os.path.join(base, "two")
    _traced(flags(demo_root, demo_pool, one, *REF), os.path.join(base, "trace_one"))
    proc = _traced(flags(demo_root, demo_pool, two, *REF), os.path.join(base, "trace_two"), processes=2)
    return base, one, two, proc


def test_two_processes_hold_the_same_model_and_memory_after_every_meta_step(runs):
    base, _, _, _ = runs
    trace = _trace(os.path.join(base, "trace_two"))
    assert set(trace) == {0, 1}
    assert trace[0][0]["world"] == trace[1][0]["world"] == 2 and trace[0][0]["pid"] != trace[1][0]["pid"]
    steps = trace[0][1:]
    assert [r["task"] for r in steps] == [4, 8, 12, 16]
    assert steps == trace[1][1:]                                   # parameters and memory, step by step
    assert len({r["params"] for r in steps}) == len(steps)         # the model moved at every step
    from methods.memory import TaskMemory
    assert steps[0]["memory"] != memory_digest(TaskMemory(4, 32))        # the memory holds the visits' images


def test_rank0_alone_writes_the_outputs(runs):
    _, _, two, proc = runs
    summary = json.load(open(os.path.join(two, "summary.json")))
    assert summary["processes"] == 2 and summary["tasks"] == 16
    assert proc.stdout.count("done: meta_test") == 1               # one process reports
    rows = [(r["task"], r["split"]) for r in read_jsonl(os.path.join(two, "metrics.jsonl"))]
    assert rows == [(t, s) for t in (8, 16) for s in ("meta_val", "meta_test")]   # each written once
    assert len([f for f in os.listdir(os.path.join(two, "tb")) if f.startswith("events.out.tfevents")]) == 1


def test_two_processes_give_the_results_of_one(runs):
    base, one, two, _ = runs
    m1, m2 = _model(one), _model(two)
    for k in m1:
        assert torch.allclose(m1[k], m2[k], atol=1e-5, rtol=0), k

    def evals(out):
        return [(r["task"], r["split"], r["acc"], r["ci"]) for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]
    assert evals(one) == evals(two)                                    # the same evaluation tasks, same accuracies
    s1, s2 = (json.load(open(os.path.join(o, "summary.json"))) for o in (one, two))
    for k in ("test_acc", "test_ci", "val_acc", "api_visits", "api_queries", "tasks"):
        assert s1[k] == s2[k], k
    assert run_memory(one).equals(run_memory(two))
    ref = _trace(os.path.join(base, "trace_one"))
    assert set(ref) == {0} and ref[0][0]["world"] == 1
    assert [r["memory"] for r in ref[0][1:]] == [r["memory"] for r in _trace(os.path.join(base, "trace_two"))[0][1:]]


def test_killed_process_stops_the_run_which_resumes_with_another_process_count(runs, demo_root, demo_pool, tmp_path):
    base, one, _, _ = runs
    out, trace = str(tmp_path / "killed"), str(tmp_path / "trace")
    argv = flags(demo_root, demo_pool, out, *REF)
    env = dict(os.environ, PYTHONPATH=REPO, BIDF_TEST_TRACE=trace, **SAME_THREADS)
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, *TORCHRUN, TRACED, *argv, *RUN_FLAGS], cwd=REPO, env=env,
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
    assert 8 <= done < 16

    res = run_cli(["main.py", *argv, "--resume"], env_extra=SAME_THREADS)      # one process now
    assert f"after task {done}" in res.stdout
    assert json.load(open(os.path.join(out, "summary.json")))["tasks"] == 16
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["task"] for r in rows if r["split"] == "meta_test"] == [8, 16]
    ours, ref = _model(out), _model(one)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-5, rtol=0), k
    assert run_memory(out).equals(run_memory(one))


def test_evaluate_over_two_processes_scores_the_same_tasks(runs, demo_root, tmp_path):
    _, one, _, _ = runs
    argv = ["--dataset", "demo", "--data_root", demo_root, "--evaluate", os.path.join(one, "best.pth"),
            "--way_train", "10", "--num_sup_test", "1", "--num_qur_test", "3", "--episode_test", "9",
            "--test_inner_update_num", "3"]
    run_cli(["main.py", *argv, "--out_dir", str(tmp_path / "e1")], env_extra=SAME_THREADS)
    proc = run_cli([*TORCHRUN, "main.py", *argv, "--out_dir", str(tmp_path / "e2")], env_extra=SAME_THREADS)
    s1, s2 = (json.load(open(tmp_path / e / "summary.json")) for e in ("e1", "e2"))
    assert (s1["test_acc"], s1["test_ci"]) == (s2["test_acc"], s2["test_ci"])     # 9 tasks: 5 on rank 0, 4 on rank 1
    assert proc.stdout.count("done:") == 1


def test_vmap_is_refused_under_torchrun_before_anything_is_written(tmp_path, monkeypatch):
    from main import parse_args
    from methods.meta_train import train
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    threads = torch.get_num_threads()
    try:        # refused before any data or pool is read: neither needs to exist
        with pytest.raises(FlagError, match="task_exec vmap:4: vmap batches .* under torchrun") as e:
            train(parse_args(flags(str(tmp_path / "data"), str(tmp_path / "pool"), str(tmp_path / "r"),
                                   "--task_exec", "vmap:4")))
    finally:
        torch.set_num_threads(threads)      # the CPU split between the two would-be processes
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "r")


# ------------------------------------------------------------------ the meta-gradient and core/dist.py (fast)

def test_task_grads_add_rows_in_task_order_like_accumulated_backwards():
    from methods.meta_gradient import TaskGrads
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
    assert all(p.grad is None for p in model.parameters())
    grads.reduce(dist.Dist())
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    # put: gradients handed over as lists (an executor's), None for a task another process ran
    again = TaskGrads(list(model.parameters()), 3)
    again.put(0, [torch.ones_like(p) for p in model.parameters()])
    again.put(1, None)
    again.put(2, [None] + [torch.ones_like(p) for p in list(model.parameters())[1:]])
    again.reduce(dist.Dist())
    first = next(model.parameters())
    assert torch.equal(first.grad, torch.ones_like(first))
    assert all(torch.equal(p.grad, 2 * torch.ones_like(p)) for p in list(model.parameters())[1:])


def test_dist_without_torchrun_is_one_process_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    procs = dist.Dist.from_env()
    assert (procs.rank, procs.world, procs.is_main) == (0, 1, True) and all(procs.owns(i) for i in range(5))
    t = torch.ones(3)
    assert dist.all_sum(t, procs) is t and torch.equal(t, torch.ones(3))
    assert dist.gather({"a": 1}, procs) == [{"a": 1}] and dist.broadcast(7, procs) == 7
    assert list(dist.gather_items({3: "c", 1: "a"}, procs)) == [1, 3]
    assert dist.on_main(lambda: 5, procs) == 5
    with pytest.raises(FlagError, match="boom"):
        dist.on_main(lambda: (_ for _ in ()).throw(FlagError("boom")), procs)
    dist.init(procs, torch.device("cpu"))                       # no process group for one process
    dist.close(procs)
    assert dist.lost_peer(dist.PeerLost()) and dist.lost_peer(RuntimeError("Gloo connection closed"))
    assert not dist.lost_peer(RuntimeError("shape mismatch"))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    procs = dist.Dist.from_env()
    assert (procs.rank, procs.world, procs.local_rank, procs.local_world, procs.is_main) == (3, 4, 1, 2, False)
    assert [i for i in range(10) if procs.owns(i)] == [3, 7]   # task i on rank i % N
