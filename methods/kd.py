"""Bi-level meta knowledge distillation: one API visit is one meta-training task.

    support set S  = recover(API, num_sup_kd per class)                    (data-free)
    S~             = A(S)                              (kd_augment: one crop/flip draw for the set)
    θ'             = θ − α ∇ KL(API(S~) || f_θ(S~))    (inner_update_num_kd steps)
    query set Q    = recover(API, num_qur_kd per class, boundary term with f_θ' fixed)
    Q~             = A(Q)                              (another draw)
    outer loss     = KL(API(Q~) || f_θ'(Q~))          (differentiable w.r.t. θ)

The task memory receives S and Q un-augmented.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.config import DEFAULTS
from dataset import normalize, random_crop_flip
from synthesis.recover import BOUNDARY_STUDENT, INVERSION_AUGMENT, ZO_SPACE, ZOConfig, check_choice, recover

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
    boundary_student: str = DEFAULTS.boundary_student       # "clean" | "perturbed" (synthesis.recover)
    kd_augment: bool = DEFAULTS.kd_augment                  # crop/flip each recovered set once before KD
    zo_space: str = DEFAULTS.zo_space                       # "normalized" | "pixel"
    inversion_augment: str = DEFAULTS.inversion_augment     # "batch" | "image"
    zo: ZOConfig | None = None      # None: white-box generator gradients (the ablation without --ZO)

    def __post_init__(self):
        check_choice("boundary_student", self.boundary_student, BOUNDARY_STUDENT)
        check_choice("zo_space", self.zo_space, ZO_SPACE)
        check_choice("inversion_augment", self.inversion_augment, INVERSION_AUGMENT)


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


def augment_set(x01: torch.Tensor, on: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One random crop/flip draw shared by the whole recovered set (as torchvision's transforms
    treat a batched tensor in the original); the API's targets are then taken on these images."""
    return random_crop_flip(x01, generator=generator, per="batch") if on else x01


def kd_task(model: nn.Module, params: Params, api, s: KDSettings, prep: Prep, *,
            boundary: bool, memory=None, generator: torch.Generator | None = None) -> KDOutcome:
    """Run one bi-level KD task against `api`; push both recovered sets into `memory`."""
    way = len(api.classes)
    classes = torch.as_tensor(api.classes, dtype=torch.long)

    opts = {"zo_space": s.zo_space, "inversion_augment": s.inversion_augment}
    sx, sy = recover(api, s.num_sup_kd, steps=s.generate_iterations, lr=s.Glr, zo=s.zo,
                     generator=generator, **opts)
    sxa = augment_set(sx, s.kd_augment, generator)
    sp = api_probs(api, sxa)
    adapted = adapt(model, params, prep(sxa), sp, kl_loss, s.inner_update_num_kd, s.inner_lr,
                    s.approx, way=way)

    student, adv = None, 0.0
    if boundary and s.adv > 0:
        fixed = {k: v.detach() for k, v in adapted.items()}
        student = lambda x01: forward(model, fixed, prep(x01), way)   # noqa: E731 (f_θ', fixed)
        adv = s.adv
    qx, qy = recover(api, s.num_qur_kd, steps=s.generate_iterations, lr=s.Glr, zo=s.zo,
                     student=student, adv=adv, generator=generator, boundary_student=s.boundary_student, **opts)
    qxa = augment_set(qx, s.kd_augment, generator)
    qp = api_probs(api, qxa)
    q_in = prep(qxa)
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
