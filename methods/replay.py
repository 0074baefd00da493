"""Task memory replay: plain MAML on a task drawn from the recovered images (docs/method.md).

    θ' = θ − α ∇ CE(f_θ(S), y_S)   (inner_update_num steps);   outer loss CE(f_θ'(Q), y_Q)

A replay task's classes are drawn from every class the memory holds (methods/memory.py), so classes of
different APIs meet in tasks no single API could give. The task itself is maml.task_loss; how the
replay tasks of a meta-batch run (one at a time, in lanes, vmapped) is the executor's choice.

replay_mix α (task interpolation, an addition to the paper; 0 = off): a second task T2 is drawn and its
class k is mixed into class k of the task, support with support and query with query,

    x = λ x1 + (1 − λ) x2,   λ ~ Beta(α, α), one λ per task,   labels those of the first task,

so each replayed class is a new class between two recovered ones: more distinct tasks from the same
recovered images, at no query.
"""
from __future__ import annotations

import torch

from core.config import Config
from core.seeding import forked_rng, seed_torch, task_rng
from dataset import Task, random_crop_flip


def augmented(task: Task, generator: torch.Generator | None = None) -> Task:
    """Random crop + flip of a replay task's images: support first, then query (the order of the
    random draws)."""
    return Task(random_crop_flip(task.support_x, generator=generator), task.support_y,
                random_crop_flip(task.query_x, generator=generator), task.query_y, task.classes)


def interpolated(task: Task, other: Task, lam: float) -> Task:
    """Task interpolation: class k of `task` mixed with class k of `other`, λ on `task`; labels of `task`."""
    mix = lambda a, b: a.mul(lam).add_(b, alpha=1.0 - lam)   # noqa: E731
    return Task(mix(task.support_x, other.support_x), task.support_y, mix(task.query_x, other.query_x),
                task.query_y, task.classes)


def draw_replay(source, cfg: Config, task_id: int, device) -> Task:
    """Replay task `task_id` from `source` (the task memory, or the real images of the maml_real baseline),
    mixed with a second task (replay_mix) and cropped and flipped (replay_augment), both off as in the
    original; its draws come from (seed, task id), the second task and λ after the first task's."""
    rng = task_rng(cfg.seed, task_id)
    with forked_rng(device):
        task = source.sample_task(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train, rng).to(device)
        if cfg.replay_mix > 0:
            other = source.sample_task(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train, rng).to(device)
            task = interpolated(task, other, float(rng.beta(cfg.replay_mix, cfg.replay_mix)))
        gen = seed_torch(rng, device)
        return augmented(task, gen) if cfg.replay_augment else task
