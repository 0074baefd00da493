"""Task memory replay: plain MAML on a task drawn from the recovered images.

    θ' = θ − α ∇ CE(f_θ(S), y_S)   (inner_update_num steps);   outer loss CE(f_θ'(Q), y_Q)
"""
from __future__ import annotations

import torch
from torch import nn

from dataset import Task, random_crop_flip

from .maml import Params, Prep, accuracy, adapt, ce_loss, forward


def replay_task(model: nn.Module, params: Params, task: Task, *, steps: int, lr: float,
                first_order: bool, prep: Prep, way: int, augment: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """(outer loss with its graph to θ, query accuracy in percent) of one replay task.

    augment: random crop + flip of the replayed images (off by default, as in the original,
    which only normalised them)."""
    sx, qx = task.support_x, task.query_x
    if augment:
        sx = random_crop_flip(sx, generator=generator)
        qx = random_crop_flip(qx, generator=generator)
    adapted = adapt(model, params, prep(sx), task.support_y, ce_loss, steps, lr, first_order, way=way)
    logits = forward(model, adapted, prep(qx), way)
    return ce_loss(logits, task.query_y), accuracy(logits.detach(), task.query_y)
