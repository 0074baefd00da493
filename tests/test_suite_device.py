"""The suite's own machinery (tests/conftest.py). BIDF_TEST_DEVICE: a device torch cannot use stops the session
with one line; off the CPU, cpu_only tests are skipped with their reason, and on it they run. The fast tier
(bash tests/run.sh --fast): no test in it uses the pool or is marked slow."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow       # each test runs pytest in a child process


def _pytest(device: str, *args: str) -> subprocess.CompletedProcess:
    # no GPU visible, so the refusal is what happens on any machine
    env = dict(os.environ, BIDF_TEST_DEVICE=device, CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cuda_without_a_gpu_stops_at_once_with_one_line():
    proc = _pytest("cuda", "tests/test_networks.py")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, lines
    assert "BIDF_TEST_DEVICE=cuda" in lines[0] and "no CUDA device" in lines[0]


# tests/test_accel.py's cpu_only tests: the dense CPU forward (2), the oneDNN chain, micro-batches, lanes
CPU_ONLY = 5


def test_cpu_only_tests_skip_with_their_reason_off_the_cpu():
    # meta: a device that is not the CPU and needs no GPU; -m cpu_only runs nothing on it
    proc = _pytest("meta", "-rs", "-m", "cpu_only", "tests/test_accel.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{CPU_ONLY} skipped" in proc.stdout and "passed" not in proc.stdout and "failed" not in proc.stdout
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("cpu_only on meta: " in line for line in skips)
    assert any("lanes are CPU threads" in line for line in skips)            # the marker's own reason
    assert any("dense channels-last path" in line for line in skips)


def test_cpu_only_tests_run_on_the_cpu():
    proc = _pytest("cpu", "-m", "cpu_only", "-k", "onednn or micro_batches", "tests/test_accel.py")
    assert proc.returncode == 0 and "2 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout


def test_the_fast_tier_holds_no_test_that_uses_the_pool_or_is_marked_slow():
    proc = _pytest("cpu", "--collect-only", "-m", "fast and not slow", "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fast = {line for line in proc.stdout.splitlines() if "::" in line}
    assert len(fast) > 200
    for name in ("test_inversion_zero_order_recovers_target_classes", "test_tiny_run_writes_every_output",
                 "test_kd_task_inner_loop_fits_the_api_on_the_support_set", "test_meta_training_beats",
                 "test_two_processes_hold_the_same_model"):
        assert not [t for t in fast if name in t], name                 # pool users: marked slow by conftest.py
    for module in ("test_zo", "test_maml", "test_accel", "test_memory", "test_config", "test_kd", "test_recover",
                   "test_api_and_pool", "test_io_and_rundir", "test_meta_train", "test_dist", "test_dataset",
                   "test_networks", "test_meta_generator", "test_pretrain", "test_report"):
        assert any(t.startswith(f"tests/{module}.py::") for t in fast), module    # every module's unit tests
