"""Functional MAML over a parameter dict (torch.func.functional_call).

The meta model is a pure function of its parameters (batch-norm with batch statistics, no
buffers), so a task-specific model is just another dict of tensors: θ' = adapt(θ, support).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

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
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps: int, lr: float,
          first_order: bool = False, *, way: int | None = None, differentiable: bool = True) -> Params:
    """θ_{k+1} = θ_k − lr · ∇_θ L(f_{θ_k}(x)[:, :way], target), `steps` times, from θ_0 = params.

    target: relative labels [B] (cross-entropy) or API probabilities [B, way] (KL); `way`
        defaults to the width of a probability target, else the full head.
    differentiable=True (meta-training): the result is a function of `params`, so the outer
        loss back-propagates into θ. Second order by default (create_graph=True: the inner
        gradients are differentiated too); first_order=True (--approx) detaches the inner
        gradients, so dθ'/dθ = I and the meta-gradient is the outer gradient taken at θ'.
    differentiable=False (evaluation): no graph is kept at all; the result is detached.
    """
    if way is None and target.dim() > 1:
        way = target.shape[1]
    if not differentiable:
        params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(params)
    for _ in range(steps):
        with torch.enable_grad():
            loss = loss_fn(forward(model, params, x, way), target)
            grads = torch.autograd.grad(loss, [params[k] for k in names],
                                        create_graph=differentiable and not first_order)
        if differentiable:
            params = {k: params[k] - lr * g for k, g in zip(names, grads)}
        else:
            params = {k: (params[k] - lr * g).detach().requires_grad_(True) for k, g in zip(names, grads)}
    if not differentiable:
        params = {k: v.detach() for k, v in params.items()}
    return params


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of correct arg-max predictions."""
    return (logits.argmax(dim=-1) == labels).float().mean().item() * 100.0


def accuracy_after_adapt(model: nn.Module, params: Params, task, steps: int, lr: float,
                         prep: Prep, way: int) -> float:
    """Test-time MAML on one task: adapt on the support set (cross-entropy, no graph), then the
    query accuracy in percent. Batch-norm uses the query batch's statistics (transductive)."""
    adapted = adapt(model, params, prep(task.support_x), task.support_y, ce_loss, steps, lr,
                    way=way, differentiable=False)
    with torch.no_grad():
        return accuracy(forward(model, adapted, prep(task.query_x), way), task.query_y)


def confidence_interval(accs) -> tuple[float, float]:
    """(mean, 95% half-width 1.96·std/√n) of per-task accuracies."""
    a = np.asarray(list(accs), dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std() / np.sqrt(len(a)))


def evaluate(model: nn.Module, params: Params, tasks: Iterable, steps: int, lr: float,
             prep: Prep, way: int, device) -> tuple[float, float]:
    """Mean query accuracy (percent) over tasks, with its 95% confidence interval."""
    return confidence_interval(accuracy_after_adapt(model, params, t.to(device), steps, lr, prep, way)
                               for t in tasks)
