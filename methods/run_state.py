"""What a meta-training run holds (methods/meta_train.py): its loop state, which a checkpoint saves, and
the objects it works with."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import accel
from core import dist
from core.config import Config


@dataclass
class LoopState:
    """Everything besides tensors that a resumed run needs to continue exactly."""
    task: int = 0                   # id of the last finished task
    visit_next: bool = True         # the first task is an API visit
    e_count: int = 0                # meta-batches since the best training accuracy (trigger)
    best_batch_acc: float | None = None
    api_visits: int = 0
    api_queries: int = 0            # queries spent (as of the checkpoint)
    recovery_steps: int = 0         # generator steps of all visits
    budget_note: bool = False
    wall_seconds: float = 0.0
    evals: int = 0
    best_val: float = -1.0          # model selection on meta_val
    best_val_ci: float = 0.0
    best_val_task: int = 0
    best_val_test: float = -1.0     # meta_test accuracy of that model
    best_val_test_ci: float = 0.0
    best_val_res: dict = field(default_factory=dict)
    best_test: float = -1.0         # the original protocol: best meta_test accuracy seen
    best_test_ci: float = 0.0
    best_test_task: int = 0
    last_res: dict = field(default_factory=dict)
    train_acc: float = 0.0          # last meta-batch's training accuracy
    distrusted: list = field(default_factory=list)     # --api_trust: the APIs no longer drawn, in order
    trust_history: dict = field(default_factory=dict)  # --api_trust: {API: its visits' sharpness, agreement}


class _Silent:
    """Stands in for the TensorBoard writer and the metrics log on the processes that write nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@dataclass
class Run:
    """What a run holds: the settings, where it runs, the meta model, its task sources and its outputs."""
    cfg: Config
    procs: dist.Dist
    device: torch.device
    ex: accel.TaskExec
    prep: object
    splits: list
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    out_dir: str
    pool: object = None             # the API pool and the task memory (BiDf-MKD), or
    memory: object = None
    real: object = None             # the real images (maml_real)
    meta_generator: object = None
    visits: object = None           # the recorded visits (--kd_replay, methods/kd_replay.py)
    state: LoopState = field(default_factory=LoopState)
    saved_task: int | None = None   # the task of the last checkpoint written
    metrics: object = field(default_factory=_Silent)
    tb: object = field(default_factory=_Silent)
    clock: tuple = (0.0, 0.0)       # (time.time() at start, wall seconds before this process)

    def queries(self) -> int:
        return self.pool.queries if self.pool is not None else 0

    def wall(self) -> float:
        return self.clock[1] + time.time() - self.clock[0]
