"""The meta-gradient of a meta-batch, Σ_i ∇_θ L_i, the same whichever process ran which task."""
from __future__ import annotations

import torch

from core import dist


class TaskGrads:
    """One row per task of the meta-batch. A process fills the rows of the tasks it ran (zero elsewhere);
    the rows are all-reduced (SUM), then added up in task order. x + 0 is exact, so the meta-gradient is
    the same bit for bit whichever process ran which task, and the same as one process accumulating the
    tasks' backwards one after another."""

    def __init__(self, params: list[torch.Tensor], tasks: int):
        self.params = params
        self.rows = torch.zeros(tasks, sum(p.numel() for p in params), device=params[0].device)

    def put(self, i: int, grads: list[torch.Tensor | None] | None) -> None:
        """Row i from task i's gradients, in the order of the parameters (None: zero)."""
        if grads is None:
            return
        self.rows[i] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                  for p, g in zip(self.params, grads)])

    def take(self, i: int) -> None:
        """Move the gradients accumulated (by a backward()) since the last take into row i."""
        self.put(i, [p.grad for p in self.params])
        for p in self.params:
            p.grad = None

    def reduce(self, procs: dist.Dist) -> None:
        """Every process's rows summed, then the tasks' rows added in task order into the .grad fields."""
        dist.all_sum(self.rows, procs)
        total = self.rows[0].clone()
        for row in self.rows[1:]:
            total += row
        offset = 0
        for p in self.params:
            p.grad = torch.empty_like(p).copy_(total[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
