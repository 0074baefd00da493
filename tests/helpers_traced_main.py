"""main.py with a trace of every meta-step, for tests/test_dist.py; launched as main.py is (also under torchrun):

    BIDF_TEST_TRACE=<folder> python tests/helpers_traced_main.py <main.py's flags>

Each process appends JSON lines to <folder>/rank<r>.jsonl: first {"pid", "world"}, then, after every optimiser
step of the meta model, {"task", "params", "memory"}: the last finished task, the SHA-256 of the meta model's
parameters and the task memory's digest (None without a memory). The library knows nothing of it: this script
wraps methods.meta_train.meta_batch (which `loop` calls by name) and, the first time the wrapper sees a run,
registers a post-step hook on the run's optimiser. Not a test module (pytest collects test_*.py only).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def memory_digest(memory) -> str:
    """SHA-256 of a TaskMemory's classes, their batches in order and the pixels: equal memories, equal digests."""
    h = hashlib.sha256()
    for c in memory.classes:
        for b in memory.batches(c):
            h.update(f"{c}:{tuple(b.shape)};".encode())
            h.update(b.contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    from core.dist import Dist
    folder = os.environ["BIDF_TEST_TRACE"]
    os.makedirs(folder, exist_ok=True)
    procs = Dist.from_env()
    path = os.path.join(folder, f"rank{procs.rank}.jsonl")

    def write(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    write({"pid": os.getpid(), "world": procs.world})

    import methods.meta_train as mt
    real = mt.meta_batch
    hooked = set()

    def traced(run, ids):
        if id(run.optimizer) not in hooked:
            hooked.add(id(run.optimizer))
            run.optimizer.register_step_post_hook(lambda opt, args, kwargs: write({
                "task": run.state.task, "params": params_digest(run.model),
                "memory": memory_digest(run.memory) if run.memory is not None else None}))
        return real(run, ids)
    mt.meta_batch = traced

    import main as entry
    return entry.main()


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    from core import cli
    cli.run(main)
