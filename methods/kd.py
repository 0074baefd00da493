"""Bi-level meta knowledge distillation: one API visit is one meta-training task.

    support set S  = recover(API, num_sup_kd per class)                    (data-free)
    S~             = A(S)                              (kd_augment: one crop/flip draw for the set)
    θ'             = θ − α ∇ KL(API(S~) || f_θ(S~))    (inner_update_num_kd steps)
    query set Q    = recover(API, num_qur_kd per class, boundary term with f_θ' fixed)
    Q~             = A(Q)                              (another draw)
    outer loss     = KL(API(Q~) || f_θ'(Q~))          (differentiable w.r.t. θ)

The task memory receives S and Q un-augmented.

Memory: with second-order MAML the inner loop's graph (inner_update_num_kd steps, each a forward
and a differentiable backward on S~) is the largest object of a visit. `lean_adapt` keeps none of it
alive: it runs the steps one at a time, dropping each step's graph and keeping only θ_0 .. θ_{K-1},
and the outer backward rebuilds one step at a time (reverse mode through the inner loop):

    v_K = ∂L_out/∂θ',   v_k = v_{k+1} − α H_k v_{k+1}  (H_k = ∇²_θ L_in(θ_k)),   ∂L_out/∂θ = v_0

Each rebuilt step is the very computation the full graph holds, so θ' and the meta-gradient are the
same (bit for bit on the CPU, tested); the peak is one step's graph instead of K, and the query set is
recovered while no graph is alive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.config import DEFAULTS
from core.device import cpu_threads
from dataset import normalize, random_crop_flip
from synthesis.recover import BOUNDARY_STUDENT, INVERSION_AUGMENT, ZO_SPACE, ZOConfig, check_choice, recover

from .maml import Params, Prep, accuracy, adapt, forward, kl_loss


class _InnerLoop:
    """The inner loop of one visit, θ_{k+1} = θ_k − α ∇_θ KL(p ‖ f_{θ_k}(x)), as a function of θ_k."""

    def __init__(self, model: nn.Module, names: list[str], x: torch.Tensor, target: torch.Tensor,
                 steps: int, lr: float, way: int):
        self.model, self.names, self.x, self.target = model, names, x, target
        self.steps, self.lr, self.way = steps, lr, way

    def step(self, theta: list[torch.Tensor], create_graph: bool):
        """(θ_k as fresh leaves, θ_{k+1}); the same operations, in the same order, as maml.adapt."""
        leaves = [t.detach().requires_grad_(True) for t in theta]
        with torch.enable_grad():
            params = dict(zip(self.names, leaves))
            loss = kl_loss(forward(self.model, params, self.x, self.way), self.target)
            grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
            nxt = [p - self.lr * g for p, g in zip(leaves, grads)]
        return leaves, nxt


class _LeanInnerLoop(torch.autograd.Function):
    """θ' = inner_loop(θ) without a kept graph; backward rebuilds the graph one step at a time."""

    @staticmethod
    def forward(ctx, loop: _InnerLoop, *theta):
        snaps, cur = [], [t.detach() for t in theta]
        for _ in range(loop.steps):
            snaps.append(cur)
            # create_graph as in the full path: θ' must be bit-identical to it (the query set depends on it)
            _, nxt = loop.step(cur, create_graph=True)
            cur = [t.detach() for t in nxt]
        ctx.loop, ctx.snaps = loop, snaps
        return tuple(cur)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *v):
        v = list(v)
        for theta in reversed(ctx.snaps):
            leaves, nxt = ctx.loop.step(theta, create_graph=True)
            with torch.enable_grad():
                v = list(torch.autograd.grad(nxt, leaves, grad_outputs=v))
        ctx.snaps = None
        return (None, *v)


def lean_adapt(model: nn.Module, params: Params, x: torch.Tensor, target: torch.Tensor, steps: int,
               lr: float, way: int) -> Params:
    """maml.adapt with kl_loss, second order, differentiable, in one inner step's memory (module docstring)."""
    if steps == 0:
        return dict(params)
    names = list(params)
    out = _LeanInnerLoop.apply(_InnerLoop(model, names, x, target, steps, lr, way), *[params[k] for k in names])
    return dict(zip(names, out))


def bounded_student(fn, chunk: int):
    """The boundary term's student run on at most `chunk` images per forward. `chunk` is one recovered
    set: its batch-norm uses batch statistics, so smaller pieces would change its outputs."""
    def student(x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[0] <= chunk:
            return fn(x01)
        return torch.cat([fn(c) for c in x01.split(chunk)])
    return student


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
    visit_threads: int = DEFAULTS.visit_threads             # CPU threads for the visit (0: unchanged)
    meta_generator_steps: int = DEFAULTS.meta_generator_steps   # steps per set when starting from a meta-generator
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
    api_confidence: float = float("nan")         # mean API probability of the target class (both sets)
    recovery_steps: int = 0                      # generator steps of the visit (both sets)


def class_diversity(x: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """{class: RMS pixel distance between two of its images, averaged over all pairs}:
    sqrt(mean_{i<j} |x_i - x_j|^2 / d). 0 when a class collapsed to one image; a diagnostic only."""
    out = {}
    for c in labels.unique().tolist():
        xc = x[labels == c].flatten(1).float()
        n = xc.shape[0]
        if n < 2:
            continue
        d2 = torch.cdist(xc, xc).pow(2)
        out[int(c)] = float((d2.sum() / (n * (n - 1)) / xc.shape[1]).sqrt())
    return out


def api_probs(api, x01: torch.Tensor) -> torch.Tensor:
    """The API's class probabilities on images in [0, 1] (normalised with its dataset's stats)."""
    return api(normalize(x01, api.spec.mean, api.spec.std)).detach()


def augment_set(x01: torch.Tensor, on: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One random crop/flip draw shared by the whole recovered set (as torchvision's transforms
    treat a batched tensor in the original); the API's targets are then taken on these images."""
    return random_crop_flip(x01, generator=generator, per="batch") if on else x01


def kd_task(model: nn.Module, params: Params, api, s: KDSettings, prep: Prep, *,
            boundary: bool, memory=None, generator: torch.Generator | None = None, lean: bool = True,
            meta_generator=None) -> KDOutcome:
    """Run one bi-level KD task against `api`; push both recovered sets into `memory`.

    lean (second order only): the inner loop through `lean_adapt`, no graph alive during the query
    recovery; False keeps maml.adapt's full graph (the reference the tests compare with).
    meta_generator: a synthesis.meta_generator.MetaGenerator: each set starts from it, runs
    meta_generator_steps steps, and updates it (Reptile); None: fresh generators (the original)."""
    with cpu_threads(s.visit_threads):
        return _visit(model, params, api, s, prep, boundary=boundary, memory=memory, generator=generator,
                      lean=lean, meta_generator=meta_generator)


def _visit(model: nn.Module, params: Params, api, s: KDSettings, prep: Prep, *, boundary: bool, memory,
           generator: torch.Generator | None, lean: bool, meta_generator) -> KDOutcome:
    """kd_task's work, with the threads it set."""
    way = len(api.classes)
    classes = torch.as_tensor(api.classes, dtype=torch.long)
    steps = s.generate_iterations if meta_generator is None else s.meta_generator_steps
    device = getattr(api, "device", "cpu")

    def recover_set(kind: str, per_class: int, **kw):
        if meta_generator is None:
            return recover(api, per_class, steps=steps, lr=s.Glr, zo=s.zo, generator=generator, **kw)
        final, nz = {}, 256         # recover()'s default latent size
        init = meta_generator.start(kind, api.classes, per_class, nz, device, generator)
        out = recover(api, per_class, steps=steps, lr=s.Glr, zo=s.zo, generator=generator, nz=nz, init=init,
                      final=final, **kw)
        meta_generator.update(kind, api.classes, final)
        return out

    opts = {"zo_space": s.zo_space, "inversion_augment": s.inversion_augment}
    sx, sy = recover_set("support", s.num_sup_kd, **opts)
    sxa = augment_set(sx, s.kd_augment, generator)
    sp = api_probs(api, sxa)
    if lean and not s.approx:
        adapted = lean_adapt(model, params, prep(sxa), sp, s.inner_update_num_kd, s.inner_lr, way)
    else:
        adapted = adapt(model, params, prep(sxa), sp, kl_loss, s.inner_update_num_kd, s.inner_lr,
                        s.approx, way=way)

    student, adv = None, 0.0
    if boundary and s.adv > 0:
        fixed = {k: v.detach() for k, v in adapted.items()}
        student = bounded_student(lambda x01: forward(model, fixed, prep(x01), way),   # f_θ', fixed
                                  way * s.num_qur_kd)
        adv = s.adv
    qx, qy = recover_set("query", s.num_qur_kd, student=student, adv=adv, boundary_student=s.boundary_student, **opts)
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
    # What the API says of its recovered images (probabilities already queried: no extra query).
    confidence = torch.cat([sp.gather(1, sy.to(sp.device)[:, None]), qp.gather(1, qy.to(qp.device)[:, None])])
    return KDOutcome(loss, accuracy(logits.detach(), qy.to(logits.device)), kl_before, support, query,
                     confidence.mean().item(), 2 * steps)
