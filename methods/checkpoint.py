"""A run's checkpoints: last.pth (resumable; written by rank 0 alone) and best.pth (the model chosen on
meta_val). The task memory's images are files of their own in <out_dir>/memory/ (append-only; last.pth
holds their index); no random state is saved: every task draws from (seed, task id)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict

from core import dist, run_dir
from core.errors import CheckpointError
from core.io import atomic_torch_save, load_checkpoint

from .memory import PREVIEW
from .run_state import LoopState


def save_last(run) -> None:
    """<out_dir>/last.pth; the memory's new batches first, then the checkpoint naming them, then the
    files it no longer names go."""
    run.saved_task = run.state.task
    if not run.procs.is_main:
        return
    run.state.wall_seconds = run.wall()
    st = asdict(run.state)
    st["api_queries"] = run.queries()
    ck = {"config": run.cfg.to_dict(), "state": st, "model": run.model.state_dict(),
          "optimizer": run.optimizer.state_dict()}
    folder = os.path.join(run.out_dir, run_dir.MEMORY_DIR)
    if run.memory is not None:
        # MH: no preview, python -m reporting draws no recovered-vs-real figure there
        ck["memory"] = run.memory.save(folder, preview=0 if run.cfg.mh else PREVIEW)
        ck["pool"] = run.pool.state_dict()
        if run.meta_generator is not None:
            ck["meta_generator"] = run.meta_generator.state_dict()
        if run.visits is not None:
            ck["visits"] = run.visits.state_dict()
    atomic_torch_save(ck, os.path.join(run.out_dir, "last.pth"))
    if run.memory is not None:      # only now may files the committed index does not name go
        run.memory.prune(folder, ck["memory"])


def save_best(run) -> None:
    if run.procs.is_main:
        atomic_torch_save({"config": run.cfg.to_dict(), "model": run.model.state_dict(), "task": run.state.task,
                           "val_acc": run.state.best_val, "test_acc": run.state.best_val_test},
                          os.path.join(run.out_dir, "best.pth"))


def resume(run, path: str) -> None:
    """Rank 0 reads the checkpoint (and the memory's files) and hands them to the other processes."""
    def read():
        ck = load_checkpoint(path, what="run checkpoint", hint="it is left untouched: restore it, or pass "
                                                              "--overwrite to start the run over")
        held = None
        if run.memory is not None:
            # the index names files in <checkpoint's folder>/memory/; a checkpoint of earlier versions holds images
            run.memory.load_state_dict(ck["memory"], folder=os.path.join(os.path.dirname(path), run_dir.MEMORY_DIR))
            held = run.memory.state_dict() if run.procs.world > 1 else None
        return ck, held
    ck, held = dist.on_main(read, run.procs)
    if run.memory is not None:
        if not run.procs.is_main:
            run.memory.load_state_dict(held)
        run.pool.load_state_dict(ck["pool"])
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    if run.meta_generator is not None and "meta_generator" in ck:
        run.meta_generator.load_state_dict(ck["meta_generator"])
    if run.visits is not None and "visits" in ck:
        run.visits.load_state_dict(ck["visits"])
    run.state = LoopState(**{k: v for k, v in ck["state"].items() if k in LoopState.__dataclass_fields__})
    run.saved_task = run.state.task


def load_meta_model(model, path: str) -> None:
    """Weights of a saved meta model (best.pth or last.pth of a run with the same geometry)."""
    ck = load_checkpoint(path, what="meta-model checkpoint", hint="pass a run's best.pth or last.pth")
    try:
        model.load_state_dict(ck["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"--evaluate {path} is not a meta-model checkpoint of this geometry "
                              f"(--backbone/--way_train/--dataset): {str(e).splitlines()[0]}") from None
