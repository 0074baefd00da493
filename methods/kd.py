"""Bi-level meta knowledge distillation: one API visit is one meta-training task (docs/method.md).

    support set S  = recover(API, num_sup_kd per class)                    (data-free)
    S~             = A(S)                              (kd_augment: one crop/flip draw for the set)
    θ'             = θ − α ∇ D(API(S~), f_θ(S~))       (inner_update_num_kd steps)
    query set Q    = recover(API, num_qur_kd per class, boundary term with f_θ' fixed)
    Q~             = A(Q)                              (another draw)
    outer loss     = D(API(Q~), f_θ'(Q~))             (differentiable w.r.t. θ)

D (kd_loss): "original", the original's F.kl_div(softmax(f), p), i.e. mean_{i,c} p_c (log p_c − softmax(f)_c)
over images and classes (softmax outputs where log-probabilities belong); "kl", KL(p ‖ softmax(f)) averaged
over images. p: the API's probabilities. API-MH with one shared generator (mh_generator "shared", the
original): the sets are recovered at the meta model's size and A crops a window of the API's size.

With --recovery screen (an addition), S and Q are screened from a procedural prior instead
(synthesis/screen.py: the candidates the API rates highest, one query each), and --screen_memory hands the
memory more of the support set's screened candidates besides.
With --api_trust, a judge (methods/trust.py) reads S and the API's answers on it first; an API it does
not trust ends the visit there: no query set, a zero outer loss, nothing for the memory.
The memory (methods/memory.py) later receives S and Q un-augmented, labelled with the classes they were
recovered for (memory_labels "target", the original) or with the API's answers on S~ and Q~ ("api", an
addition: the replayed labels then agree with the teacher; no extra query). With second-order MAML the inner
loop keeps no step's graph (maml.adapt's recompute): the query set is recovered while no graph is
alive, and the outer backward rebuilds one step at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import accel
import torch.nn.functional as F

from core.config import Config, recovery_steps
from dataset import MIX_IMAGE_SIZE, normalize, random_crop_flip, resize
from network.generator import LATENT_DIM
from synthesis.api import probabilities
from synthesis.recover import recover
from synthesis.screen import screen

from .maml import Params, Prep, adapt, forward, hits, kl_loss, percent


@dataclass
class KDOutcome:
    loss: torch.Tensor              # outer KL on the query set through θ' (graph to θ)
    acc: float                      # f_θ' accuracy on Q against the targeted classes, percent
    kl_before: float                # KL on Q with θ (no adaptation), for diagnostics
    support: tuple[torch.Tensor, torch.Tensor] | None   # (images in [0, 1], absolute class ids); None: dropped
    query: tuple[torch.Tensor, torch.Tensor] | None
    api_confidence: float = float("nan")         # mean API probability of the target class (both sets)
    recovery_steps: int = 0                      # generator steps of the visit (both sets)
    verdict: dict | None = None                  # the judge's record (--api_trust)
    api_agreement: float = float("nan")          # share of recovered images the API assigns to their target
    queried: tuple | None = None                 # (S~, p_S, Q~, p_Q): what the API answered (--kd_replay)
    spare: tuple[torch.Tensor, torch.Tensor] | None = None  # more screened images for the memory (--screen_memory)


def bounded_student(fn, chunk: int):
    """The boundary term's student run on at most `chunk` images per forward. `chunk` is one recovered
    set: its batch-norm uses batch statistics, so smaller pieces would change its outputs."""
    def student(x01: torch.Tensor) -> torch.Tensor:
        if x01.shape[0] <= chunk:
            return fn(x01)
        return torch.cat([fn(c) for c in x01.split(chunk)])
    return student


def api_probs(api, x01: torch.Tensor) -> torch.Tensor:
    """The API's class probabilities on images in [0, 1] (normalised with its dataset's stats)."""
    return probabilities(api, api(normalize(x01, api.spec.mean, api.spec.std))).detach()


def augment_set(x01: torch.Tensor, on: bool, generator: torch.Generator | None, size: int) -> torch.Tensor:
    """One random crop/flip draw shared by the whole recovered set (as torchvision's transforms
    treat a batched tensor in the original), of the API's image size; the API's targets are then taken
    on these images. Off: the images as they are (resized to the API's size if they are not)."""
    return random_crop_flip(x01, generator=generator, per="batch", size=size) if on else resize(x01, size)


def original_kd_loss(logits: torch.Tensor, api_probs: torch.Tensor) -> torch.Tensor:
    """The original's F.kl_div(softmax(f(x)), p): mean over images and classes of p_c (log p_c − softmax(f)_c)."""
    return F.kl_div(F.softmax(logits, dim=-1), api_probs, reduction="none").mean()


KD_LOSSES = {"original": original_kd_loss, "kl": kl_loss}


def kd_task(model: nn.Module, params: Params, api, cfg: Config, prep: Prep, *, boundary: bool,
            generator: torch.Generator | None = None, meta_generator=None, judge=None) -> KDOutcome:
    """One bi-level KD task against `api`, on cfg.visit_threads CPU threads (0: the process's).

    boundary: recover the query set with the boundary term (adv = cfg.adv).
    meta_generator: a synthesis.meta_generator.MetaGenerator: each set starts from it, runs
    cfg.meta_generator_steps steps, and updates it (Reptile); None: fresh generators (the original).
    judge: (api, S, its labels, the API's probabilities on S) -> a verdict with "trusted" (methods/trust.py)."""
    with accel.cpu_threads(cfg.visit_threads):
        return _visit(model, params, api, cfg, prep, boundary, generator, meta_generator, judge)


def _visit(model, params, api, cfg: Config, prep: Prep, boundary: bool, generator, meta_generator,
           judge) -> KDOutcome:
    way = len(api.classes)
    classes = torch.as_tensor(api.classes, dtype=torch.long)
    device = getattr(api, "device", "cpu")
    size = MIX_IMAGE_SIZE if cfg.mh and cfg.mh_generator == "shared" else api.spec.image_size
    loss_fn = KD_LOSSES[cfg.kd_loss]

    def recover_set(kind: str, per_class: int, **kw):
        if cfg.recovery == "screen":
            return screen(api, per_class, cfg, generator=generator, image_size=size, **kw)
        if meta_generator is None:
            return recover(api, per_class, cfg, generator=generator, image_size=size, **kw)
        final = {}
        init = meta_generator.start(kind, api.classes, per_class, LATENT_DIM, device, generator)
        out = recover(api, per_class, cfg, generator=generator, image_size=size, init=init, final=final, **kw)
        meta_generator.update(kind, api.classes, final)
        return out

    spare = {"per_class": cfg.screen_memory} if cfg.recovery == "screen" and cfg.screen_memory else None
    sx, sy = recover_set("support", cfg.num_sup_kd, **({"spare": spare} if spare else {}))
    sxa = augment_set(sx, cfg.kd_augment, generator, api.spec.image_size)
    sp = api_probs(api, sxa)
    verdict = judge(api, sx, sy, sp) if judge is not None else None
    if verdict is not None and not verdict["trusted"]:
        zero = sum(p.sum() for p in params.values()) * 0.0       # a loss with a (zero) gradient to θ
        return KDOutcome(zero, float("nan"), float("nan"), None, None,
                         sp.gather(1, sy.to(sp.device)[:, None]).mean().item(), recovery_steps(cfg), verdict)
    adapted = adapt(model, params, prep(sxa), sp, loss_fn, cfg.inner_update_num_kd, cfg.inner_lr,
                    way=way, first_order=cfg.approx, recompute=not cfg.approx)

    student, adv = None, 0.0
    if boundary and cfg.adv > 0:
        fixed = {k: v.detach() for k, v in adapted.items()}
        student = bounded_student(lambda x01: forward(model, fixed, prep(x01), way),   # f_θ', fixed
                                  way * cfg.num_qur_kd)
        adv = cfg.adv
    qx, qy = recover_set("query", cfg.num_qur_kd, student=student, adv=adv)
    qxa = augment_set(qx, cfg.kd_augment, generator, api.spec.image_size)
    qp = api_probs(api, qxa)
    q_in = prep(qxa)
    logits = forward(model, adapted, q_in, way)
    loss = loss_fn(logits, qp)
    with torch.no_grad():
        kl_before = kl_loss(forward(model, params, q_in, way), qp).item()
    # What the API says of its recovered images (probabilities already queried: no extra query).
    confidence = torch.cat([sp.gather(1, sy.to(sp.device)[:, None]), qp.gather(1, qy.to(qp.device)[:, None])])
    agreement = torch.cat([sp.argmax(1).cpu() == sy.cpu(), qp.argmax(1).cpu() == qy.cpu()]).float().mean().item()
    # memory_labels "api": the API's own answer on each image (already queried) instead of its target
    s_mem, q_mem = (sp.argmax(1), qp.argmax(1)) if cfg.memory_labels == "api" else (sy, qy)
    return KDOutcome(loss, percent(hits(logits.detach(), qy.to(logits.device))), kl_before,
                     (sx.detach(), classes[s_mem.cpu()]), (qx.detach(), classes[q_mem.cpu()]),
                     confidence.mean().item(), 2 * recovery_steps(cfg), verdict, agreement,
                     (sxa.detach(), sp, qxa.detach(), qp) if cfg.kd_replay > 0 else None,
                     (spare["images"], classes[spare["labels"].cpu()]) if spare else None)
