"""Bi-level meta knowledge distillation: one API visit is one meta-training task.

    support set S  = recover(API, num_sup_kd per class)                    (data-free)
    θ'             = θ − α ∇ KL(API(S) || f_θ(S))      (inner_update_num_kd steps)
    query set Q    = recover(API, num_qur_kd per class, boundary term with f_θ' fixed)
    outer loss     = KL(API(Q) || f_θ'(Q))            (differentiable w.r.t. θ)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.config import DEFAULTS
from dataset import normalize
from synthesis.recover import ZOConfig, recover

from .maml import Params, Prep, accuracy, adapt, forward, kl_loss


@dataclass
class KDSettings:
    """The settings of one API visit; names and defaults are core.config.Config's."""
    num_sup_kd: int = DEFAULTS.num_sup_kd
    num_qur_kd: int = DEFAULTS.num_qur_kd
    inner_update_num_kd: int = DEFAULTS.inner_update_num_kd
    inner_lr: float = DEFAULTS.inner_lr
    approx: bool = DEFAULTS.approx              # first-order MAML
    generate_iterations: int = DEFAULTS.generate_iterations
    Glr: float = DEFAULTS.Glr
    adv: float = DEFAULTS.adv
    zo: ZOConfig | None = None      # None: white-box generator gradients (the ablation without --ZO)


@dataclass
class KDOutcome:
    loss: torch.Tensor              # outer KL on the query set through θ' (graph to θ)
    acc: float                      # f_θ' accuracy on Q against the targeted classes, percent
    kl_before: float                # KL on Q with θ (no adaptation), for diagnostics
    support: tuple[torch.Tensor, torch.Tensor]   # (images in [0, 1], absolute class ids)
    query: tuple[torch.Tensor, torch.Tensor]


def api_probs(api, x01: torch.Tensor) -> torch.Tensor:
    """The API's class probabilities on images in [0, 1] (normalised with its dataset's stats)."""
    return api(normalize(x01, api.spec.mean, api.spec.std)).detach()


def kd_task(model: nn.Module, params: Params, api, s: KDSettings, prep: Prep, *,
            boundary: bool, memory=None, generator: torch.Generator | None = None) -> KDOutcome:
    """Run one bi-level KD task against `api`; push both recovered sets into `memory`."""
    way = len(api.classes)
    classes = torch.as_tensor(api.classes, dtype=torch.long)

    sx, sy = recover(api, s.num_sup_kd, steps=s.generate_iterations, lr=s.Glr, zo=s.zo,
                     generator=generator)
    sp = api_probs(api, sx)
    adapted = adapt(model, params, prep(sx), sp, kl_loss, s.inner_update_num_kd, s.inner_lr,
                    s.approx, way=way)

    student, adv = None, 0.0
    if boundary and s.adv > 0:
        fixed = {k: v.detach() for k, v in adapted.items()}
        student = lambda x01: forward(model, fixed, prep(x01), way)   # noqa: E731 (f_θ', fixed)
        adv = s.adv
    qx, qy = recover(api, s.num_qur_kd, steps=s.generate_iterations, lr=s.Glr, zo=s.zo,
                     student=student, adv=adv, generator=generator)
    qp = api_probs(api, qx)
    q_in = prep(qx)
    logits = forward(model, adapted, q_in, way)
    loss = kl_loss(logits, qp)
    with torch.no_grad():
        kl_before = kl_loss(forward(model, params, q_in, way), qp).item()

    support = (sx.detach(), classes[sy.cpu()])
    query = (qx.detach(), classes[qy.cpu()])
    if memory is not None:
        memory.add(*support)
        memory.add(*query)
    return KDOutcome(loss, accuracy(logits.detach(), qy.to(logits.device)), kl_before, support, query)
