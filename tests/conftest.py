"""Shared, session-scoped fixtures: a small demo dataset (`demo_root`), a small pretrained API pool on it
(`demo_pool`) and a tiny meta-training run on them (`tiny_run`); a smaller demo dataset for the fast tier
(`small_demo_root`); the test device; the fast tier. Helpers that are not fixtures: tests/helpers.py.

Built once per test session (in a temp dir) so every test file can use them cheaply.

The fast tier (`bash tests/run.sh --fast`, i.e. `-m "fast and not slow"`): the tests marked `fast` (most files
mark the whole module: `pytestmark = pytest.mark.fast`) and not `slow`. A test is slow when it pretrains or
uses the API pool or the pool's demo data (any test whose fixtures include `demo_pool` or `demo_root` is
marked slow here, automatically), launches a training run (main.py, pretrain.py, torchrun) or takes more than
a few seconds; such tests carry `@pytest.mark.slow`. An unmarked test runs in the whole suite only.
"""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# As every entry point does (core/cli.py), before torch loads its OpenMP runtime: passive OpenMP waiting
# (spinning threads made a conv4 backward 70x slower at load 7 on 2 cores; subprocesses inherit it) and
# glibc's malloc keeping freed memory.
from accel.process import setup_process  # noqa: E402

setup_process()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# ------------------------------------------------------------------ the test device
# BIDF_TEST_DEVICE=cuda runs the device-independent tests on the GPU (bench/gpu_check.sh); tests that
# check what only holds on the CPU carry @pytest.mark.cpu_only(reason) and skip there.
try:
    DEVICE = torch.device(os.environ.get("BIDF_TEST_DEVICE") or "cpu")
except RuntimeError as e:   # raised at import: pytest would bury it in a traceback
    raise SystemExit(f"error: BIDF_TEST_DEVICE={os.environ['BIDF_TEST_DEVICE']!r} is not a torch device ({e})")
ON_CPU = DEVICE.type == "cpu"
if DEVICE.type == "cuda":   # float32 checks mean float32: cuDNN rounds convolutions to TF32 (10 bits) by default
    torch.backends.cudnn.allow_tf32 = False
    from core.device import deterministic_kernels
    deterministic_kernels()     # two runs compared bit for bit must run the same kernels
# Off the CPU, every main.py / pretrain.py run of the tests uses deterministic kernels too (runs and
# their resumes are compared bit for bit).
RUN_FLAGS = [] if DEVICE.type == "cpu" else ["--deterministic"]


def device_tol(cpu: float, other: float) -> float:
    """A tolerance that may be looser off the CPU (other kernels sum in other orders); the CPU's
    stays as tight as it was."""
    return cpu if ON_CPU else other


# Fixtures that make a test slow wherever it uses them (directly or through another fixture): the demo dataset
# the pool is pretrained on (seconds to generate) and the pool. Fast tests use small_demo_root.
HEAVY_FIXTURES = ("demo_root", "demo_pool")


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: a unit test of a few seconds at most, in the fast tier "
                                       "(bash tests/run.sh --fast: -m 'fast and not slow')")
    config.addinivalue_line("markers", "slow: pretrains, uses the API pool, launches training runs or takes more "
                                       "than a few seconds; left out of the fast tier even in a fast module")
    config.addinivalue_line("markers", "cpu_only(reason): checks what holds on the CPU only; skipped, with the "
                                       "reason, when BIDF_TEST_DEVICE is not the CPU")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"BIDF_TEST_DEVICE={DEVICE} but torch sees no CUDA device (torch {torch.__version__}, "
                    f"CUDA build {torch.version.cuda}); unset it to test on the CPU", returncode=4)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(f in item.fixturenames for f in HEAVY_FIXTURES) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
    if ON_CPU:
        return
    for item in items:
        mark = item.get_closest_marker("cpu_only")
        if mark is not None:
            why = mark.args[0] if mark.args else mark.kwargs.get("reason", "CPU only")
            item.add_marker(pytest.mark.skip(reason=f"cpu_only on {DEVICE}: {why}"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device tests put their tensors, models and APIs on (BIDF_TEST_DEVICE, default cpu)."""
    return DEVICE


DEMO_IMAGES_PER_CLASS = 60      # smaller than the default to keep the suite fast
SMALL_DEMO_IMAGES_PER_CLASS = 12    # the fast tier's demo data: enough for 5-way tasks of a few shots
POOL_SIZE = 3
POOL_EPOCHS = 8


def run_cli(args: list[str], cwd: str = REPO, env_extra: dict | None = None, check: bool = True,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repo root; returns the completed process (text output)."""
    env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
    if "main.py" in args or "pretrain.py" in args:     # also under torchrun
        args = [*args, *RUN_FLAGS]
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kill_after_first_save(flags: list[str], out: str) -> None:
    """Start `python main.py <flags>` and kill -9 it as soon as <out>/last.pth exists (a run that
    ends before its first save fails the calling test)."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "main.py", *flags, *RUN_FLAGS], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = os.path.join(out, "last.pth")
    deadline = time.time() + 240
    while not os.path.exists(last) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "summary.json")), "the run ended before it could be killed"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> str:
    """A data root holding the demo dataset (DEMO_IMAGES_PER_CLASS images per class)."""
    from dataset.demo import ensure_demo
    root = str(tmp_path_factory.mktemp("DFL2Ldata"))
    ensure_demo(root, images_per_class=DEMO_IMAGES_PER_CLASS, seed=0)
    return root


@pytest.fixture(scope="session")
def small_demo_root(tmp_path_factory) -> str:
    """A data root holding the demo dataset with SMALL_DEMO_IMAGES_PER_CLASS images per class (the fast tier's)."""
    from dataset.demo import ensure_demo
    root = str(tmp_path_factory.mktemp("DFL2Ldata_small"))
    ensure_demo(root, images_per_class=SMALL_DEMO_IMAGES_PER_CLASS, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def demo_pool(demo_root, tmp_path_factory) -> str:
    """A pretrained pool of POOL_SIZE conv4 5-way APIs on the demo data; returns the prefix
    (pass as --pretrained_path_prefix)."""
    prefix = str(tmp_path_factory.mktemp("pretrained_blackbox"))
    run_cli(["pretrain.py", "--dataset", "demo", "--pre_backbone", "conv4", "--APInum", str(POOL_SIZE),
             "--epochs", str(POOL_EPOCHS), "--data_root", demo_root, "--pretrained_path_prefix", prefix,
             "--seed", "0"])
    return prefix


@pytest.fixture(scope="session")
def tiny_run(demo_root, demo_pool, tmp_path_factory):
    """A tiny BiDf-MKD run of 16 tasks on the demo fixtures (tests/helpers.py TINY), evaluated every 8 tasks
    and saved every 4; returns (out_dir, its flags, the completed process). Tests read it, never write it."""
    from helpers import flags
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    argv = flags(demo_root, demo_pool, out, "--episode_train", "16", "--val_interval", "8", "--save_interval", "4")
    proc = run_cli(["main.py", *argv])
    return out, argv, proc
