"""core/io.py (atomic writes, checkpoints loaded as plain data), core/run_dir.py (the never-overwrite rule,
the metrics log), core/cli.py (one line and an exit code), core/seeding.py and core/device.py."""
from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from conftest import run_cli
from core import run_dir
from core.config import Config
from core.errors import BidfError, CheckpointError, FlagError, Interrupted, RunDirError
from core.io import atomic_json, atomic_torch_save, atomic_write, load_checkpoint, read_json

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

# ------------------------------------------------------------------ atomic writes


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "model_specific_0.pth")

    def crashing_write(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crashing_write)
    assert os.listdir(tmp_path) == []
    atomic_json({"a": 1}, path)                     # a whole file, then another whole one over it
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crashing_write)
    assert read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["model_specific_0.pth"]


# ------------------------------------------------------------------ checkpoints are data, never code


class _Payload:
    """Unpickling this runs `open(path, 'w')`: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_checkpoint_reads_plain_data_only(tmp_path):
    good = tmp_path / "good.pth"
    atomic_torch_save({"w": torch.ones(2), "state": {"task": 3, "best": (1.0, 2.0)}}, str(good))
    assert load_checkpoint(str(good))["state"]["task"] == 3
    with pytest.raises(CheckpointError, match="cannot read") as e:
        load_checkpoint(str(tmp_path / "missing.pth"), what="run checkpoint", hint="restore it")
    assert "\n" not in str(e.value) and str(e.value).endswith("; restore it")
    marker, hostile = tmp_path / "pwned", tmp_path / "hostile.pth"
    with open(hostile, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="not a plain-data") as e:
        load_checkpoint(str(hostile))
    assert not marker.exists() and "\n" not in str(e.value)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(str(tmp_path / "list.pth"))
    (tmp_path / "torn.pth").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        load_checkpoint(str(tmp_path / "torn.pth"))


def test_evaluate_refuses_a_checkpoint_that_would_run_code(tmp_path, small_demo_root):
    from main import main
    marker = tmp_path / "pwned"
    ck = tmp_path / "best.pth"
    with open(ck, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError) as e:
        main(["--dataset", "demo", "--data_root", small_demo_root, "--evaluate", str(ck), "--episode_test", "2",
              "--num_sup_test", "1", "--num_qur_test", "3", "--out_dir", str(tmp_path / "eval")])
    assert str(ck) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists() and not (tmp_path / "eval").exists()


# ------------------------------------------------------------------ the run directory


def test_run_dir_is_never_overwritten_without_being_asked(tmp_path):
    out = str(tmp_path / "run")
    cfg = Config(dataset="demo", q=7)
    assert run_dir.prepare(cfg, out) is None                         # a new run
    assert read_json(os.path.join(out, "config.json"))["q"] == 7
    with pytest.raises(RunDirError, match="unfinished run with these flags \\(no checkpoint yet\\).*--resume"):
        run_dir.prepare(cfg, out)
    with pytest.raises(RunDirError, match="other flags \\(--q 7 -> 8\\).*--overwrite") as e:
        run_dir.prepare(Config(dataset="demo", q=8), out)
    assert "\n" not in str(e.value)
    # settings a resume may change (runtime ones) are no other run
    assert run_dir.prepare(Config(dataset="demo", q=7, resume=True, task_exec="sequential"), out) is None
    torch.save({}, os.path.join(out, "last.pth"))
    with pytest.raises(RunDirError, match="\\(a checkpoint\\)"):
        run_dir.prepare(cfg, out)
    assert run_dir.prepare(Config(dataset="demo", q=7, resume=True), out) == os.path.join(out, "last.pth")
    atomic_json({"test_acc": 1.0}, os.path.join(out, "summary.json"))
    with pytest.raises(RunDirError, match="holds a finished run"):
        run_dir.prepare(cfg, out)
    assert run_dir.prepare(Config(dataset="demo", q=7, resume=True), out) == "finished"
    # --overwrite deletes the run's outputs, and only those
    os.makedirs(os.path.join(out, "memory"))
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert run_dir.prepare(Config(dataset="demo", q=8, overwrite=True), out) is None
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt"]
    assert read_json(os.path.join(out, "config.json"))["q"] == 8


def test_metrics_log_drops_lines_after_the_checkpoint_and_a_torn_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = run_dir.MetricsLog(path)
    for t in (4, 8, 12):
        log.write({"task": t, "acc": float(t)})
    with open(path, "a") as f:
        f.write('{"task": 16, "ac')                                     # killed mid-line
    run_dir.MetricsLog(path, keep_until_task=8).write({"task": 12, "acc": 1.0})
    rows = [json.loads(line) for line in open(path)]
    assert [(r["task"], r["acc"]) for r in rows] == [(4, 4.0), (8, 8.0), (12, 1.0)]
    run_dir.MetricsLog(path)                                            # a new run starts an empty log
    assert open(path).read() == ""


# ------------------------------------------------------------------ entry points: one line, an exit code


def _cli(code: str):
    return run_cli(["-c", "import sys; from core import cli; from core.errors import *\n" + code], check=False)


def test_cli_prints_a_project_error_as_one_line_and_keeps_bugs_tracebacks():
    proc = _cli("def f():\n    raise FlagError('--x must be at least 1')\ncli.run(f)")
    assert (proc.returncode, proc.stderr) == (2, "error: --x must be at least 1\n")
    proc = _cli("def f():\n    raise Interrupted('interrupted during task 3; kept')\ncli.run(f)")
    assert (proc.returncode, proc.stderr) == (130, "interrupted during task 3; kept\n")
    proc = _cli("def f():\n    raise KeyError('bug')\ncli.run(f)")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = _cli("import os\ndef f():\n    print(os.environ['OMP_WAIT_POLICY'])\ncli.run(f)")
    assert proc.returncode == 0 and proc.stdout == "PASSIVE\n"          # the process settings came first


def test_cli_run_in_process(monkeypatch, capsys):
    from core import cli

    def fail():
        raise FlagError("--q must be at least 1, got 0")
    with pytest.raises(SystemExit) as e:
        cli.run(fail)
    assert e.value.code == 2 and capsys.readouterr().err == "error: --q must be at least 1, got 0\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):                                     # under torchrun rank 0 alone prints
        cli.run(fail)
    assert capsys.readouterr().err == ""
    assert cli.run(lambda a, b=0: a + b, 1, b=2) == 3
    assert issubclass(Interrupted, BidfError)


# ------------------------------------------------------------------ seeding and the device


def test_task_draws_depend_on_seed_and_task_id_only():
    from core.seeding import forked_rng, seed_torch, task_rng
    a = task_rng(3, 7).integers(1 << 30, size=4)
    task_rng(3, 8).integers(1 << 30, size=100)                          # another task ran in between
    assert np.array_equal(a, task_rng(3, 7).integers(1 << 30, size=4))
    assert not np.array_equal(a, task_rng(3, 8).integers(1 << 30, size=4))
    assert not np.array_equal(a, task_rng(4, 7).integers(1 << 30, size=4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with forked_rng("cpu"):
        g = seed_torch(task_rng(3, 7), "cpu")
        x, y = torch.rand(3), torch.rand(3, generator=g)
    assert torch.equal(torch.get_rng_state(), before)                   # the global RNG as it was
    with forked_rng("cpu"):
        g = seed_torch(task_rng(3, 7), "cpu")
        assert torch.equal(x, torch.rand(3)) and torch.equal(y, torch.rand(3, generator=g))


def test_pick_device_without_cuda_is_the_cpu(monkeypatch):
    from core.device import pick_device
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    said = []
    threads = torch.get_num_threads()
    try:
        assert pick_device(0, say=said.append) == torch.device("cpu")
        assert said == ["no CUDA device: running on the CPU"]
        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        pick_device(0, world=2, say=said.append)                       # two processes split the cores
        assert torch.get_num_threads() == 2 and "2 processes, 2 thread(s) each" in said[-1]
    finally:
        torch.set_num_threads(threads)


def test_errors_are_one_family():
    from core import errors
    for name in ("FlagError", "DataError", "PoolError", "CheckpointError", "RunDirError", "QueryBudgetExceeded",
                 "Interrupted"):
        assert issubclass(getattr(errors, name), BidfError)
    assert issubclass(errors.PoolError, errors.DataError)
    assert sys.modules["core.errors"].__doc__
