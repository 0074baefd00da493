"""Every random draw of a task comes from (seed, task id): the task is then the same whichever process
runs it, in whatever order, after whatever ran before it there (docs/distributed.md).

    rng = task_rng(seed, task_id)            numpy draws of the task (classes, images, which API)
    with forked_rng(device):                 the global torch RNG, restored after the task
        gen = seed_torch(rng, device)        torch draws of the task (inits, crops, directions)
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np


def task_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of task `index` in a seeded sequence: task i is the same whatever the order."""
    return np.random.default_rng([seed, index])


@contextmanager
def forked_rng(device):
    """The global torch RNG (the CPU's and `device`'s) as it was before the block, after it."""
    import torch
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        yield


def seed_torch(rng: np.random.Generator, device):
    """Seed the global torch RNG from the task's rng; a torch.Generator on `device` for what takes one."""
    import torch
    torch.manual_seed(int(rng.integers(2 ** 62)))
    return torch.Generator(device=device).manual_seed(int(rng.integers(2 ** 62)))
