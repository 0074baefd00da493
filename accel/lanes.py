"""CPU threads: small pieces of work side by side, each in a thread of its own (a "lane").

A task of few-shot meta-learning is too small for intra-op threads to pay (bench/RESULTS.md); N tasks at
once, one per core, do scale. The same holds for the blocks of directions of a zero-order step: two
single-threaded pipelines keep both cores of a small CPU busy through the small ops (pooling, ReLU,
direction draws) that one two-threaded pipeline leaves half idle. Each lane runs on 1/N of the process's
threads (at least one) and what a piece computes depends only on the threads it runs on, so with one
thread per lane the results are a one-thread run's, bit for bit; results are always combined in the
pieces' order.
"""
from __future__ import annotations

import contextlib
import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn

T = TypeVar("T")
ZO_LANES = 2        # CPU: blocks per chunk of zero-order directions, run at once when there are threads for them
_POOL: dict = {}
_POOL_LOCK = threading.Lock()
_zo_lanes = [ZO_LANES]


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's CPU threads set to n inside the block (n = 0: unchanged), restored after it."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0:
            torch.set_num_threads(before)


def lane_pool(lanes: int, threads_each: int) -> ThreadPoolExecutor:
    """The process's lane threads, made once per (lanes, threads_each) and kept (a zero-order step
    uses them at every generator step); each runs torch ops on threads_each intra-op threads."""
    with _POOL_LOCK:
        if _POOL.get("key") != (lanes, threads_each):
            if "pool" in _POOL:
                _POOL["pool"].shutdown(wait=True)
            _POOL["pool"] = ThreadPoolExecutor(lanes, thread_name_prefix="lane", initializer=torch.set_num_threads,
                                               initargs=(threads_each,))
            _POOL["key"] = (lanes, threads_each)
        return _POOL["pool"]


def results_in_order(futures) -> list:
    """The futures' results in their order; on the first failure the rest are cancelled, then it is raised."""
    futures = list(futures)
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise


def map_in_lanes(model: nn.Module, fn: Callable[[nn.Module, object], T], items: Iterable, lanes: int) -> list[T]:
    """[fn(model, item) for item in items], `lanes` items at once; results in the items' order.

    Each lane calls fn with its own deep copy of `model`: torch.func.functional_call swaps the
    tensors of the module it is given, so two threads must not share one. Items are taken from
    `items` in this thread, in order, at most 2 * lanes ahead of the results.
    """
    pool = lane_pool(lanes, max(1, torch.get_num_threads() // lanes))
    local = threading.local()

    def run(item) -> T:
        if not hasattr(local, "model"):
            local.model = copy.deepcopy(model)
        return fn(local.model, item)

    out, pending = [], deque()
    try:
        for item in items:
            pending.append(pool.submit(run, item))
            if len(pending) >= 2 * lanes:
                out.append(pending.popleft().result())
    except BaseException:
        for f in pending:
            f.cancel()
        raise
    return out + results_in_order(pending)


# ---------------------------------------------------------------- the blocks of a zero-order step

def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """0..n-1 as `parts` near-equal contiguous ranges (at most n)."""
    parts = max(1, min(int(parts), n))
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def direction_blocks(q: int, numsplit: int, device) -> list[tuple[int, int]]:
    """Direction ranges (j0, j1) of one zero-order step: `numsplit` chunks (the memory knob), each cut
    into ZO_LANES blocks on the CPU so that two can run at once (sum_in_order)."""
    lanes = _zo_lanes[0] if torch.device(device).type == "cpu" else 1
    return [(a + i, a + k) for a, z in _split(q, numsplit) for i, k in _split(z - a, lanes)]


def sum_in_order(fn: Callable[[int, int], torch.Tensor], blocks: list[tuple[int, int]], out: torch.Tensor,
                 concurrent: bool = True) -> torch.Tensor:
    """out += fn(j0, j1) for each block, added in block order whichever ran first. On the CPU with 2+
    torch threads, ZO_LANES blocks run at once, each on a single-threaded lane; concurrent=False runs
    them in turn (fn not thread-safe)."""
    lanes, threads = _zo_lanes[0], torch.get_num_threads()
    if concurrent and out.device.type == "cpu" and lanes >= 2 and threads >= 2 and len(blocks) >= 2:
        pool = lane_pool(lanes, max(1, threads // lanes))
        for s in results_in_order(pool.submit(fn, j0, j1) for j0, j1 in blocks):
            out += s
    else:
        for j0, j1 in blocks:
            out += fn(j0, j1)
    return out


@contextlib.contextmanager
def zo_lanes(n: int):
    """Blocks per chunk of directions inside the block (bench: 1 is the original's plain loop)."""
    before, _zo_lanes[0] = _zo_lanes[0], max(1, int(n))
    try:
        yield
    finally:
        _zo_lanes[0] = before
