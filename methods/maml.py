"""Functional MAML: the one inner loop of the method, and the per-task functions built on it.

The meta model is a pure function of its parameters (batch-norm with batch statistics, no buffers),
so a task-specific model is just another dict of tensors, θ' = adapt(θ, support). Every adaptation of
the method runs through `adapt`: replay tasks (cross-entropy), API visits (KL to the API), evaluation
(no graph). The per-task functions below are pure functions of tensors, so an executor may run tasks
one at a time, in CPU lanes or vmapped (accel.map_tasks / accel.grad_tasks).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import accel

Params = dict[str, torch.Tensor]
Prep = Callable[[torch.Tensor], torch.Tensor]   # images in [0, 1] -> meta-model input


def meta_params(model: nn.Module) -> Params:
    """θ: the meta model's own parameters (leaves; the outer optimiser updates them)."""
    return dict(model.named_parameters())


def forward(model: nn.Module, params: Params, x: torch.Tensor, way: int | None = None) -> torch.Tensor:
    """Logits of f_params(x), restricted to the first `way` outputs (the task's classes)."""
    logits = functional_call(model, params, (x,))
    return logits if way is None else logits[:, :way]


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against relative labels (replay and evaluation tasks)."""
    return F.cross_entropy(logits, labels)


def kl_loss(logits: torch.Tensor, api_probs: torch.Tensor) -> torch.Tensor:
    """KL(API(x) || f(x)) = Σ_c p_c (log p_c − log softmax(f(x))_c), averaged over the batch.

    A proper KL: log-probabilities of the student, probabilities of the API (temperature 1);
    the original passed softmax outputs where log-probabilities belong (docs/differences.md)."""
    return F.kl_div(F.log_softmax(logits, dim=-1), api_probs, reduction="batchmean")


def adapt(model: nn.Module, params: Params, x: torch.Tensor, target: torch.Tensor,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps: int, lr: float, *,
          way: int | None = None, first_order: bool = False, recompute: bool = False) -> Params:
    """θ_{k+1} = θ_k − lr · ∇_θ L(f_{θ_k}(x)[:, :way], target), `steps` times, from θ_0 = params.

    target: relative labels [B] (cross-entropy) or API probabilities [B, way] (KL); `way` defaults to
        the width of a probability target, else the full head.
    The result is a function of `params`: the outer loss back-propagates into θ, second order (the
    inner gradients are differentiated too) unless first_order (--approx): the inner gradients are
    then not differentiated, dθ'/dθ = I, and the meta-gradient is the outer gradient taken at θ'. Under
    torch.no_grad (evaluation) nothing is kept beyond θ'. ∇ is accel.param_grad: torch.autograd.grad,
    or torch.func.grad when an executor vmaps tasks.
    recompute: keep no step's graph, only θ_0 .. θ_{K-1}; the outer backward recomputes one step at a
        time (torch.utils.checkpoint per step): the same θ' and meta-gradient, bit for bit on the CPU, in
        one step's memory instead of K.
    """
    if way is None and target.dim() > 1:
        way = target.shape[1]

    def step(p: Params) -> Params:
        g = accel.param_grad(lambda q: loss_fn(forward(model, q, x, way), target), p, create_graph=not first_order)
        return {k: p[k] - lr * g[k] for k in p}

    for _ in range(steps):
        params = _recomputed(step, params) if recompute else step(params)
    return params


def _recomputed(step: Callable[[Params], Params], params: Params) -> Params:
    """step(params) whose graph is rebuilt during the backward instead of kept."""
    names = list(params)
    out = checkpoint(lambda *v: tuple(step(dict(zip(names, v))).values()), *params.values(),
                     use_reentrant=False, preserve_rng_state=False)
    return dict(zip(names, out))


def hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fraction of arg-max predictions that are right (a 0-d tensor; percent = 100 · float(it))."""
    return (logits.argmax(dim=-1) == labels).float().mean()


def percent(fraction) -> float:
    return float(fraction) * 100.0


def task_loss(model: nn.Module, params: Params, sx, sy, qx, qy, *, steps: int, lr: float, way: int,
              first_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One replay (MAML) task: θ' = adapt(θ, S) with cross-entropy, then (CE(f_θ'(Q), y_Q) with its graph
    to θ, the fraction of Q classified right). Images already prepared for the meta model."""
    adapted = adapt(model, params, sx, sy, ce_loss, steps, lr, way=way, first_order=first_order)
    logits = forward(model, adapted, qx, way)
    return ce_loss(logits, qy), hits(logits.detach(), qy)


def task_hits(model: nn.Module, params: Params, sx, sy, qx, qy, *, steps: int, lr: float,
              way: int) -> torch.Tensor:
    """One evaluation task: adapt on the support set (cross-entropy), then the fraction of the query set
    classified right. Batch-norm uses the query batch's statistics (transductive). Run under no_grad."""
    adapted = adapt(model, params, sx, sy, ce_loss, steps, lr, way=way)
    return hits(forward(model, adapted, qx, way), qy)


def confidence_interval(accs) -> tuple[float, float]:
    """(mean, 95% half-width 1.96·std/√n) of per-task accuracies."""
    a = np.asarray(list(accs), dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std() / np.sqrt(len(a)))
