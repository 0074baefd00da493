"""Episodic sampling of N-way K-shot Q-query tasks from a split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.errors import DataError
from core.seeding import task_rng

from .split import SplitData


@dataclass
class Task:
    """One few-shot task. Images in [0, 1]; labels relative (0..way-1), grouped by class."""
    support_x: torch.Tensor     # [way*shot, C, H, W]
    support_y: torch.Tensor     # [way*shot]
    query_x: torch.Tensor       # [way*query, C, H, W]
    query_y: torch.Tensor       # [way*query]
    classes: np.ndarray         # absolute class id of each relative label

    def to(self, device) -> "Task":
        return Task(self.support_x.to(device), self.support_y.to(device),
                    self.query_x.to(device), self.query_y.to(device), self.classes)


def check_episode(data: SplitData, way: int, shot: int, query: int, kind: str = "test") -> None:
    """Fail fast when a split cannot supply `way`-way tasks of `shot` + `query` images per class,
    naming the flags to change (--way_<kind>, --num_sup_<kind>, --num_qur_<kind>)."""
    where = f"{data.spec.name}/{data.split}"
    if way > data.num_classes:
        raise DataError(f"way_{kind} {way} exceeds the {data.num_classes} classes of {where}; "
                        f"lower way_{kind}")
    smallest = min(len(data.indices_of(c)) for c in range(data.num_classes))
    if shot + query > smallest:
        raise DataError(f"num_sup_{kind} {shot} + num_qur_{kind} {query} images per class, "
                        f"but a class of {where} has only {smallest}; lower num_sup_{kind}/num_qur_{kind}")


def sample_task(data: SplitData, way: int, shot: int, query: int, rng: np.random.Generator) -> Task:
    """Draw `way` distinct classes, then `shot` + `query` distinct images of each."""
    classes = rng.choice(data.num_classes, size=way, replace=False)
    sup, qur = [], []
    for c in classes:
        idx = rng.choice(data.indices_of(int(c)), size=shot + query, replace=False)
        sup.append(idx[:shot]); qur.append(idx[shot:])
    rel = torch.arange(way)
    return Task(data.images(np.concatenate(sup)), rel.repeat_interleave(shot),
                data.images(np.concatenate(qur)), rel.repeat_interleave(query), classes)


def fixed_tasks(data: SplitData, way: int, shot: int, query: int, n: int, seed: int, indices=None):
    """The n evaluation tasks of a seed, lazily; identical across runs and processes.
    indices: only those of the n tasks, in that order (one process's share)."""
    for i in (range(n) if indices is None else indices):
        yield sample_task(data, way, shot, query, task_rng(seed, i))
