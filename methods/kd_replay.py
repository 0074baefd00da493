"""KD replay: an API visit's bi-level KD task run again later, from what the visit recorded, at no query
(--kd_replay ρ, an addition to the paper; docs/differences.md B21).

A visit queried the API on its two augmented recovered sets; it records exactly those pairs,
(S~, p_S) and (Q~, p_Q). With --kd_replay ρ, each replay task becomes, with probability ρ, one of the
last kd_replay_keep recorded visits, drawn uniformly, and runs the visit's own bi-level task again:

    θ' = θ − α ∇ D(p_S, f_θ(S~))  (inner_update_num_kd steps);   outer loss D(p_Q, f_θ'(Q~))

D is --kd_loss, as in the visit. Plain replay (methods/replay.py) teaches the memory's hard labels; this
teaches the API's full answers again, which say how alike the API finds its classes. The choice and
the draw come from their own stream of (seed, task id), so ρ = 0 leaves the run as it was.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.config import Config

from .maml import Params, Prep, adapt, forward, hits, percent

STREAM = 0x6b64     # the task's own stream for the choice: the replay task's draws stay as they were


@dataclass
class VisitRecord:
    """What a visit queried: its augmented sets (8-bit pixels) and the API's probabilities on them."""
    api: str
    support: torch.Tensor           # uint8 [n_s, C, H, W]
    support_probs: torch.Tensor     # float [n_s, way]
    query: torch.Tensor             # uint8 [n_q, C, H, W]
    query_probs: torch.Tensor       # float [n_q, way]

    @staticmethod
    def of(api: str, sxa, sp, qxa, qp) -> "VisitRecord":
        pixels = lambda x: x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()   # noqa: E731
        return VisitRecord(api, pixels(sxa), sp.detach().float().cpu(), pixels(qxa), qp.detach().float().cpu())


class VisitMemory:
    """The last `keep` recorded visits, oldest first."""

    def __init__(self, keep: int):
        self.records: deque[VisitRecord] = deque(maxlen=keep)

    def add(self, record: VisitRecord) -> None:
        self.records.append(record)

    def drop_owner(self, api: str) -> int:
        """Forget the visits of API `api` (--api_trust distrusted it); returns how many went."""
        kept = [r for r in self.records if r.api != api]
        gone = len(self.records) - len(kept)
        self.records = deque(kept, maxlen=self.records.maxlen)
        return gone

    def __len__(self) -> int:
        return len(self.records)

    def state_dict(self) -> list[dict]:
        return [vars(r).copy() for r in self.records]

    def load_state_dict(self, state: list[dict]) -> None:
        self.records = deque((VisitRecord(**r) for r in state), maxlen=self.records.maxlen)


def pick(cfg: Config, task_id: int, held: int) -> int | None:
    """Which recorded visit replay task `task_id` runs again (index among the `held` ones), or None: a
    plain replay task. Drawn from (seed, task id, STREAM), apart from the replay task's own draws."""
    if cfg.kd_replay <= 0 or held == 0:
        return None
    rng = np.random.default_rng([cfg.seed, task_id, STREAM])
    return int(rng.integers(held)) if rng.random() < cfg.kd_replay else None


def kd_replay_task(model: nn.Module, params: Params, record: VisitRecord, cfg: Config, prep: Prep, loss_fn,
                   device) -> tuple[torch.Tensor, float]:
    """The recorded visit's bi-level KD task on θ: (outer loss with its graph to θ, f_θ' accuracy on the
    query set against the API's answers, percent)."""
    way = record.support_probs.shape[1]
    images = lambda x: prep(x.to(device).float().div_(255.0))    # noqa: E731
    sp, qp = record.support_probs.to(device), record.query_probs.to(device)
    adapted = adapt(model, params, images(record.support), sp, loss_fn, cfg.inner_update_num_kd, cfg.inner_lr,
                    way=way, first_order=cfg.approx, recompute=not cfg.approx)
    logits = forward(model, adapted, images(record.query), way)
    return loss_fn(logits, qp), percent(hits(logits.detach(), qp.argmax(1)))
