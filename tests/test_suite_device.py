"""BIDF_TEST_DEVICE (tests/conftest.py): a device torch cannot use stops the session with one line;
off the CPU, cpu_only tests are skipped with their reason, and on it they run."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


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


def test_cpu_only_tests_skip_with_their_reason_off_the_cpu():
    # meta: a device that is not the CPU and needs no GPU; -m cpu_only runs nothing on it
    proc = _pytest("meta", "-rs", "-m", "cpu_only", "tests/test_synthesis.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 skipped" in proc.stdout and "passed" not in proc.stdout and "failed" not in proc.stdout
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("cpu_only on meta: " in line for line in skips)
    assert any("its own seed" in line for line in skips)                     # the marker's own reason
    assert any("dense channels-last path" in line for line in skips)


def test_cpu_only_tests_run_on_the_cpu():
    proc = _pytest("cpu", "-m", "cpu_only", "tests/test_synthesis.py")
    assert proc.returncode == 0 and "5 passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout
