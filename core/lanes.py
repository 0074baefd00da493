"""Small tasks side by side on the CPU: each in a thread of its own ("lane") with one copy of the model.

A task of few-shot meta-learning is too small for intra-op threads to pay (bench/RESULTS.md, "threads
for small-batch meta-learning"); N tasks at once, one per core, do scale. Each lane runs on 1/N of the process's threads (at least one), and what a task computes
depends only on the threads it runs on, so with one thread per lane the results are a one-thread
run's, bit for bit. Used by --eval_lanes (evaluation) and --replay_lanes (a meta-batch's replay tasks);
the zero-order estimate's blocks of directions run on the same lane threads (synthesis/zo.py).
"""
from __future__ import annotations

import copy
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn

T = TypeVar("T")
_POOL: dict = {}
_POOL_LOCK = threading.Lock()


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
