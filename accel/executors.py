"""How a batch of few-shot tasks runs: one at a time, in CPU lanes, or vmapped in chunks.

The method writes each task as one pure function of tensors (methods/maml.py: `task_loss` for a replay
task, `task_hits` for an evaluation task); an executor only decides how the tasks of a meta-batch or of
an evaluation are computed:

    sequential   one task after another on the process's threads
    lanes:N      N tasks at once, each in a CPU thread of its own with 1/N of the process's threads
                 (accel/lanes.py): a task computes what it would on that many threads, so with one
                 thread per lane the numbers are a one-thread sequential run's, bit for bit
    vmap:N       chunks of N equally shaped tasks as one torch.func.vmap computation (GPUs: few large
                 kernels instead of many small ones); the same numbers to float rounding
    auto         what bench/RESULTS.md measured fastest: vmap:16 on a GPU (one process), lanes on a CPU
                 with 2+ threads (one lane per thread), else sequential

`choose` holds every rule about which executor may run where. `param_grad` is the gradient the inner loop
takes: torch.func.grad under a vmapped executor (it composes with vmap), torch.autograd.grad elsewhere (the
same numbers with less overhead per op on small tasks).
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from core.errors import FlagError

from .lanes import map_in_lanes

KINDS = ("auto", "sequential", "lanes", "vmap")
VMAP_CHUNK = 16         # tasks per vmapped chunk on a GPU (bench/RESULTS.md, "tasks batched with vmap")
_VMAPPED = contextvars.ContextVar("vmapped", default=False)     # inside a vmapped executor's call (this thread)


def param_grad(loss_of: Callable[[dict], torch.Tensor], params: dict, create_graph: bool = True) -> dict:
    """∇_p loss_of(p) for a dict of tensors p; differentiable (create_graph) when asked and grad mode is on.
    Parameters that do not require grad are differentiated from detached copies (test-time adaptation)."""
    if _VMAPPED.get():
        g = grad(loss_of)(params)
        return g if create_graph else {k: v.detach() for k, v in g.items()}
    create_graph = create_graph and torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
        g = torch.autograd.grad(loss_of(leaves), list(leaves.values()), create_graph=create_graph)
    return dict(zip(leaves, g))


def _vmapped(fn: Callable, *args, in_dims=0):
    """vmap(fn)(*args) with batch-norm as elementwise ops and param_grad in its functional form."""
    token = _VMAPPED.set(True)
    try:
        with _ElementwiseBatchNorm():
            return vmap(fn, in_dims=in_dims)(*args)
    finally:
        _VMAPPED.reset(token)


@dataclass(frozen=True)
class TaskExec:
    kind: str           # sequential | lanes | vmap
    width: int = 1      # lanes: tasks at once; vmap: tasks per chunk

    def __str__(self) -> str:
        return self.kind if self.kind == "sequential" else f"{self.kind}:{self.width}"


def parse(spec: str) -> tuple[str, int | None]:
    """'lanes:2' -> ('lanes', 2); 'vmap' -> ('vmap', None). Raises FlagError naming the setting."""
    kind, _, width = str(spec).partition(":")
    if kind not in KINDS or (width and not width.isdigit()) or (width and kind in ("auto", "sequential")):
        raise FlagError(f"task_exec {spec!r} is unknown; choose auto, sequential, lanes[:N] or vmap[:N]")
    if width and int(width) < 1:
        raise FlagError(f"task_exec {spec!r}: N must be at least 1")
    return kind, int(width) if width else None


def choose(spec: str, device, world: int = 1) -> TaskExec:
    """The executor `spec` names, checked against the device and the number of processes (the rules)."""
    kind, width = parse(spec)
    cpu = torch.device(device).type == "cpu"
    threads = torch.get_num_threads()
    if kind == "auto":
        if not cpu:
            kind, width = ("vmap", VMAP_CHUNK) if world == 1 else ("sequential", 1)
        else:
            kind, width = ("lanes", threads) if threads >= 2 else ("sequential", 1)
    if kind == "lanes" and not cpu:
        raise FlagError(f"task_exec {spec}: lanes run tasks in CPU threads; on {device} use vmap (or auto)")
    if kind == "vmap" and world > 1:
        raise FlagError(f"task_exec {spec}: vmap batches a meta-batch's tasks in one process; under torchrun the "
                        "tasks are spread over the processes instead: use sequential (or auto)")
    if kind == "lanes" and (width or threads) == 1 or kind == "sequential":
        return TaskExec("sequential", 1)
    return TaskExec(kind, width or (threads if kind == "lanes" else VMAP_CHUNK))


Item = Sequence[torch.Tensor]


def map_tasks(ex: TaskExec, model: nn.Module, fn: Callable, items: Iterable[Item]) -> list[tuple]:
    """fn(model, *item) for each item, in order, without a graph (under no_grad): tuples of tensors per item."""
    def one(m, item):
        with torch.no_grad():
            out = fn(m, *item)
        return out if isinstance(out, tuple) else (out,)
    if ex.kind != "vmap":
        return _each(ex, model, one, items)
    out = []
    for chunk in _same_shape_chunks(items, ex.width):
        with torch.no_grad():
            res = _vmapped(lambda *t: fn(model, *t), *_stack(chunk))
        res = res if isinstance(res, tuple) else (res,)
        out += list(zip(*(r.unbind(0) for r in res)))
    return out


def grad_tasks(ex: TaskExec, model: nn.Module, fn: Callable, params: dict, items: Iterable[Item]) -> list[tuple]:
    """For each item: (fn(model, params, *item) as floats, ∇_params of its first output). fn's first output
    is the task's loss. vmap: one gradient per chunk (of the chunk's summed losses), given with the
    chunk's first task, None with the others. Gradients are lists in the order of `params`, None where a
    parameter is unused."""
    leaves = list(params.values())

    def one(m, item):
        out = fn(m, params, *item)
        grads = torch.autograd.grad(out[0], leaves, allow_unused=True)
        return tuple(float(o.detach()) for o in out), list(grads)
    if ex.kind != "vmap":
        return _each(ex, model, one, items)
    out = []
    for chunk in _same_shape_chunks(items, ex.width):
        res = _vmapped(lambda *t: fn(model, params, *t), *_stack(chunk))
        grads = list(torch.autograd.grad(res[0].sum(), leaves, allow_unused=True))
        floats = list(zip(*(r.tolist() for r in res)))
        out += [(f, grads if i == 0 else None) for i, f in enumerate(floats)]
    return out


def _each(ex: TaskExec, model: nn.Module, one: Callable, items: Iterable[Item]) -> list:
    """[one(model, item) for item in items]: in lanes (ex.width at once, each lane with a copy of the model)
    or one after another."""
    if ex.kind == "lanes":
        return map_in_lanes(model, one, items, ex.width)
    return [one(model, item) for item in items]


def _stack(chunk: list[Item]) -> list[torch.Tensor]:
    return [torch.stack(ts) for ts in zip(*chunk)]


def _same_shape_chunks(items: Iterable[Item], size: int):
    """Consecutive items in lists of at most `size`, cut where their shapes change."""
    chunk, key = [], None
    for it in items:
        k = tuple(t.shape for t in it)
        if chunk and (len(chunk) == size or k != key):
            yield chunk
            chunk = []
        chunk.append(it)
        key = k
    if chunk:
        yield chunk


def _batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """y = (x − μ) / √(σ² + ε) · γ + β with the batch's μ, σ² (biased) over all dims but channels."""
    if running_mean is not None and training:
        raise ValueError("vmapped tasks need a meta model whose batch-norm uses batch statistics only "
                         "(no running buffers): build it with batch_stats=True, or use task_exec sequential")
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
    """F.batch_norm as elementwise ops while tasks are vmapped: PyTorch's batching rule for batch_norm
    gives wrong second-order gradients under vmap(grad) (the tests compare with the one-task path in
    float64); its decomposition is exact."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            return _batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
