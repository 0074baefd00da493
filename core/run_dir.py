"""The run directory: its layout, the metrics log, and the never-overwrite rule.

    <out_dir>/config.json   the flags of the run
    <out_dir>/metrics.jsonl one line per evaluated split
    <out_dir>/last.pth      resumable checkpoint (every save_interval tasks and at the end); it holds the
                            index of the task memory, whose images are in memory/
    <out_dir>/memory/       the task memory's images: one append-only file per recovered set
                            (batch_<id>.pt, written at the first save after the visit; files the
                            committed last.pth no longer names are deleted after each save)
    <out_dir>/best.pth      meta model with the best meta-val accuracy
    <out_dir>/summary.json  final figures (its presence marks a finished run)
    <out_dir>/tb/           TensorBoard logs
"""
from __future__ import annotations

import json
import os
import shutil

from .config import Config, config_diff
from .errors import RunDirError
from .io import atomic_json, atomic_text, read_json

MEMORY_DIR = "memory"
OUTPUTS = ("config.json", "metrics.jsonl", "last.pth", "best.pth", "summary.json", "tb", MEMORY_DIR)


def prepare(cfg: Config, out_dir: str) -> str | None:
    """Make `out_dir` ready for this run; return the checkpoint to resume from, if any.

    A directory holding another run is never overwritten unless --overwrite is given; a run
    with the same flags is continued only with --resume."""
    cfg_path = os.path.join(out_dir, "config.json")
    last = os.path.join(out_dir, "last.pth")
    if os.path.isfile(cfg_path):
        if cfg.overwrite:
            for name in OUTPUTS:
                p = os.path.join(out_dir, name)
                if os.path.isdir(p):
                    shutil.rmtree(p)
                elif os.path.exists(p):
                    os.remove(p)
        else:
            old = read_json(cfg_path)
            diff = config_diff(old, cfg.to_dict())
            if diff:
                shown = ", ".join(f"--{k} {old.get(k)!r} -> {getattr(cfg, k, None)!r}" for k in diff[:4])
                raise RunDirError(f"{out_dir} holds a run with other flags ({shown}); choose another "
                                 "--out_dir, or pass --overwrite to delete it and start over")
            if os.path.isfile(os.path.join(out_dir, "summary.json")):
                if cfg.resume:
                    return "finished"
                raise RunDirError(f"{out_dir} holds a finished run; choose another --out_dir, or pass "
                                 "--overwrite to delete it and start over")
            if not cfg.resume:
                where = "a checkpoint" if os.path.isfile(last) else "no checkpoint yet"
                raise RunDirError(f"{out_dir} holds an unfinished run with these flags ({where}); pass "
                                 "--resume to continue it or --overwrite to start over")
            if os.path.isfile(last):
                return last
    os.makedirs(out_dir, exist_ok=True)
    atomic_json(cfg.to_dict(), cfg_path)
    return None


class MetricsLog:
    """metrics.jsonl: appended and flushed line by line; on resume, lines written after the
    checkpoint (and a torn last line) are dropped so that no evaluation is counted twice."""

    def __init__(self, path: str, keep_until_task: int | None = None):
        self.path = path
        if keep_until_task is None:
            open(path, "w").close()
            return
        kept = []
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if row.get("task", 0) <= keep_until_task:
                        kept.append(line if line.endswith("\n") else line + "\n")
        atomic_text("".join(kept), path)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
