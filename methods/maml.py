"""Functional MAML over a parameter dict (torch.func.functional_call).

The meta model is a pure function of its parameters (batch-norm with batch statistics, no
buffers), so a task-specific model is just another dict of tensors: θ' = adapt(θ, support).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from core.errors import FlagError
from core.lanes import map_in_lanes

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


# ---------------------------------------------------------------- tasks batched with torch.func

def _batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """y = (x − μ) / √(σ² + ε) · γ + β with the batch's μ, σ² (biased) over all dims but channels."""
    if running_mean is not None and training:
        raise FlagError("vmapped tasks need a meta model whose batch-norm uses batch statistics only "
                        "(no running buffers); build it with batch_stats=True or keep --eval_chunk 1 "
                        "and --no-replay_vmap")
    shape = [1, -1] + [1] * (x.dim() - 2)
    if running_mean is None:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    y = (x - mean) * scale
    return y if bias is None else y + bias.view(shape)


class _ElementwiseBatchNorm(TorchFunctionMode):
    """F.batch_norm as elementwise ops while tasks are vmapped: PyTorch's batching rule for
    batch_norm gives wrong second-order gradients under vmap(grad) (tests/test_vmap.py compares
    with the one-task path in float64); its decomposition is exact."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            return _batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _adapt_fn(model: nn.Module, loss_fn, steps: int, lr: float, first_order: bool, way: int | None):
    """θ ↦ θ_steps of one task, in torch.func form (vmapped over tasks by the callers):
    θ_{k+1} = θ_k − lr · ∇_θ L(f_{θ_k}(x)[:, :way], target). The inner gradient is itself
    differentiable (second order) unless first_order (--approx) detaches it."""
    inner_grad = grad(lambda p, x, t: loss_fn(forward(model, p, x, way), t))

    def run(params: Params, x: torch.Tensor, target: torch.Tensor) -> Params:
        for _ in range(steps):
            g = inner_grad(params, x, target)
            params = {k: params[k] - lr * (g[k].detach() if first_order else g[k]) for k in params}
        return params
    return run


def stack_tasks(tasks: Sequence, prep: Prep) -> tuple[torch.Tensor, ...]:
    """(support x, support y, query x, query y) of equally shaped tasks, stacked on a leading task
    dim; images through `prep` ([T, N, C, H, W])."""
    def images(xs):
        x = prep(torch.cat(xs))
        return x.view(len(xs), -1, *x.shape[1:])
    return (images([t.support_x for t in tasks]), torch.stack([t.support_y for t in tasks]),
            images([t.query_x for t in tasks]), torch.stack([t.query_y for t in tasks]))


def query_logits_vmapped(model: nn.Module, params: Params, tasks: Sequence, steps: int, lr: float,
                         prep: Prep, way: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, Q, way] query logits after test-time adaptation, [T, Q] query labels) of equally shaped
    tasks, all as one vmapped computation (adaptation with torch.func.grad, no graph kept)."""
    fixed = {k: v.detach() for k, v in params.items()}
    run = _adapt_fn(model, ce_loss, steps, lr, False, way)
    sx, sy, qx, qy = stack_tasks(tasks, prep)
    with torch.no_grad(), _ElementwiseBatchNorm():
        return vmap(lambda sx, sy, qx: forward(model, run(fixed, sx, sy), qx, way))(sx, sy, qx), qy


def accuracies_vmapped(model: nn.Module, params: Params, tasks: Sequence, steps: int, lr: float,
                       prep: Prep, way: int) -> list[float]:
    """accuracy_after_adapt of each task (equal shapes), all tasks as one vmapped computation."""
    logits, qy = query_logits_vmapped(model, params, tasks, steps, lr, prep, way)
    return [a * 100.0 for a in (logits.argmax(dim=-1) == qy).float().mean(dim=-1).tolist()]


def outer_losses_vmapped(model: nn.Module, params: Params, tasks: Sequence, steps: int, lr: float,
                         first_order: bool, prep: Prep, way: int) -> tuple[torch.Tensor, list[float]]:
    """([T] outer losses CE(f_θ'(Q), y_Q) with their graph to θ, query accuracies in percent) of
    equally shaped replay tasks, as one vmapped computation. Σ losses back-propagates to the
    meta-gradient the tasks' separate backwards accumulate (methods.replay.replay_task)."""
    run = _adapt_fn(model, ce_loss, steps, lr, first_order, way)

    def one(p, sx, sy, qx, qy):
        logits = forward(model, run(p, sx, sy), qx, way)
        return ce_loss(logits, qy), (logits.argmax(dim=-1) == qy).float().mean()

    with _ElementwiseBatchNorm():
        losses, acc = vmap(one, in_dims=(None, 0, 0, 0, 0))(params, *stack_tasks(tasks, prep))
    return losses, [a * 100.0 for a in acc.tolist()]


def _same_shape_chunks(tasks: Iterable, size: int):
    """Consecutive tasks in lists of at most `size`, cut where the tasks' shapes change."""
    chunk, key = [], None
    for t in tasks:
        k = (t.support_x.shape, t.query_x.shape)
        if chunk and (len(chunk) == size or k != key):
            yield chunk
            chunk = []
        chunk.append(t)
        key = k
    if chunk:
        yield chunk


def task_accuracies(model: nn.Module, params: Params, tasks: Iterable, steps: int, lr: float,
                    prep: Prep, way: int, device, chunk: int = 1, lanes: int = 1) -> list[float]:
    """accuracy_after_adapt of each task, in order (percent).

    chunk > 1: `chunk` tasks at a time as one vmapped computation (accuracies_vmapped); the same
    accuracies to float rounding. chunk 1: one task at a time (faster on the CPU).
    lanes > 1 (CPU, chunk 1): `lanes` tasks at once in threads of their own (core.lanes); with one
    thread per lane the accuracies are a one-thread run's, bit for bit (tested)."""
    if lanes > 1:
        if chunk > 1 or torch.device(device).type != "cpu":
            raise FlagError("--eval_lanes runs evaluation tasks in CPU threads, one task at a time each: use it "
                            "on the CPU with --eval_chunk 1 (on a GPU, --eval_chunk batches tasks instead)")
        return map_in_lanes(model, lambda m, t: accuracy_after_adapt(m, params, t.to(device), steps, lr, prep, way),
                            tasks, lanes)
    if chunk <= 1:
        return [accuracy_after_adapt(model, params, t.to(device), steps, lr, prep, way) for t in tasks]
    accs = []
    for group in _same_shape_chunks(tasks, chunk):
        accs += accuracies_vmapped(model, params, [t.to(device) for t in group], steps, lr, prep, way)
    return accs


def evaluate(model: nn.Module, params: Params, tasks: Iterable, steps: int, lr: float,
             prep: Prep, way: int, device, chunk: int = 1, lanes: int = 1) -> tuple[float, float]:
    """Mean query accuracy (percent) over tasks, with its 95% confidence interval (task_accuracies)."""
    return confidence_interval(task_accuracies(model, params, tasks, steps, lr, prep, way, device, chunk, lanes))
