"""Timing and memory meters for the benchmarks: repetitions with a warm-up, medians, peak memory.

Peak memory
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, i.e. the most tensor memory
          the measured code held at once (the caching allocator may reserve more).
    CPU:  the process's resident-set high-water mark (VmHWM in /proc/self/status, the counter that
          getrusage's ru_maxrss reports), reset before the measurement by writing 5 to
          /proc/self/clear_refs, after handing freed heap back to the OS (malloc_trim). `peak_mem_mb`
          is the whole process (Python, torch's libraries, everything already loaded: comparable to
          a training run's RSS); `peak_mem_delta_mb` is what the measurement added on top of the RSS
          it started from. Where the counter cannot be reset, the process-lifetime ru_maxrss is used
          and `peak_mem_kind` says so.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024     # kB
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryMeter:
    """with MemoryMeter(device) as m: ...   then m.result() -> {"peak_mem_mb", "peak_mem_delta_mb", "peak_mem_kind"}."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "MemoryMeter":
        gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2 ** 20
        else:
            _malloc_trim()
            self.base = _status_mb("VmRSS")
            self.resettable = self.base is not None and _reset_hwm()
            if not self.resettable:
                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            self.kind = "torch.cuda.max_memory_allocated"
        elif self.resettable:
            self.peak = _status_mb("VmHWM")
            self.kind = "process peak RSS (VmHWM, reset before the measurement)"
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.kind = "process-lifetime peak RSS (getrusage ru_maxrss; could not be reset)"

    def result(self) -> dict:
        return {"peak_mem_mb": round(self.peak, 1), "peak_mem_delta_mb": round(self.peak - self.base, 1),
                "peak_mem_kind": self.kind}


def repeat(fn: Callable[[], dict | None], device: torch.device, *, min_reps: int, max_reps: int,
           budget_s: float) -> list[dict]:
    """Call fn at least min_reps times, then again while the time spent is under budget_s and
    fewer than max_reps calls were made. One record per call: {"wall", "cpu", **fn()} where wall is
    seconds (CUDA synchronised before and after) and cpu the process CPU seconds summed over threads."""
    recs, spent = [], 0.0
    while len(recs) < min_reps or (spent < budget_s and len(recs) < max_reps):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        extra = fn() or {}
        sync(device)
        wall = time.perf_counter() - t0
        recs.append({"wall": wall, "cpu": time.process_time() - c0, **extra})
        spent += wall
    return recs


def median(recs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in recs)


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    """What a reader needs to judge the figures: software, hardware, and how busy the machine was."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "device": str(device),
           "mkldnn": torch.backends.mkldnn.is_available()}
    try:
        with open("/proc/meminfo") as f:
            env["mem_total_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return env
