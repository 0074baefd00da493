"""Task memory replay: plain MAML on a task drawn from the recovered images.

    θ' = θ − α ∇ CE(f_θ(S), y_S)   (inner_update_num steps);   outer loss CE(f_θ'(Q), y_Q)

The tasks of a meta-batch may run one at a time (replay_task), together as one vmapped
computation (replay_tasks; Σ_i ∇_θ CE_i the same to float rounding), or side by side in CPU threads
(replay_in_lanes; with one thread per lane the gradients of a one-thread run, bit for bit).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from core.lanes import map_in_lanes
from dataset import Task, random_crop_flip

from .maml import Params, Prep, accuracy, adapt, ce_loss, forward, outer_losses_vmapped


def augmented(task: Task, generator: torch.Generator | None = None) -> Task:
    """Random crop + flip of a replay task's images: support first, then query (the order of the
    random draws)."""
    return Task(random_crop_flip(task.support_x, generator=generator), task.support_y,
                random_crop_flip(task.query_x, generator=generator), task.query_y, task.classes)


def replay_task(model: nn.Module, params: Params, task: Task, *, steps: int, lr: float,
                first_order: bool, prep: Prep, way: int, augment: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """(outer loss with its graph to θ, query accuracy in percent) of one replay task.

    augment: random crop + flip of the replayed images (off by default, as in the original,
    which only normalised them)."""
    if augment:
        task = augmented(task, generator)
    adapted = adapt(model, params, prep(task.support_x), task.support_y, ce_loss, steps, lr, first_order, way=way)
    logits = forward(model, adapted, prep(task.query_x), way)
    return ce_loss(logits, task.query_y), accuracy(logits.detach(), task.query_y)


def replay_tasks(model: nn.Module, params: Params, tasks: Sequence[Task], *, steps: int, lr: float,
                 first_order: bool, prep: Prep, way: int) -> tuple[torch.Tensor, list[float]]:
    """([T] outer losses with their graph to θ, query accuracies) of equally shaped replay tasks
    (already augmented where wanted), as one vmapped computation."""
    return outer_losses_vmapped(model, params, tasks, steps, lr, first_order, prep, way)


def replay_in_lanes(model: nn.Module, params: Params, tasks: Sequence[Task], *, lanes: int, steps: int, lr: float,
                    first_order: bool, prep: Prep, way: int) -> list[tuple[float, float, list[torch.Tensor | None]]]:
    """replay_task of each task (already augmented where wanted), `lanes` at a time in CPU threads
    (core.lanes); per task (outer loss, query accuracy, ∇_θ L in the order of `params`, None where
    unused). A task's gradient depends only on the threads it ran on: with one thread per lane it is
    what loss.backward() leaves on one thread, bit for bit (tested)."""
    leaves = list(params.values())

    def one(m: nn.Module, task: Task):
        loss, acc = replay_task(m, params, task, steps=steps, lr=lr, first_order=first_order, prep=prep, way=way)
        return loss.item(), acc, list(torch.autograd.grad(loss, leaves, allow_unused=True))
    return map_in_lanes(model, one, tasks, lanes)
