"""Data recovery from one API by generator inversion (docs/method.md).

A freshly initialised generator G and latent codes z ~ N(0, I) are optimised jointly, Adam(Glr,
betas (0.5, 0.999)), so that the API assigns G(z) to its target class:

    x = G(z);  x~ = random_crop_flip(x);  n = normalize(x~)
    l_i = CE(API(n_i), y_i)  [- adv m_i D(API(n_i), s_i)],   s = f(x~) the fixed adapted student

The API answers logits (api_output "logits", as the original's: CE and the L1 distance D on logits) or
probabilities ("probs": CE = -log p_y, D the L1 distance of the probability vectors).

Black-box (ZO): dl/dn is estimated with zo_grad around the normalised batch n (zo_space "normalized",
mu in normalised units), mapped to dl/dx~ = dl/dn / std per channel, and handed to G and z through the
surrogate <x~, stopgrad(g)>. zo_space "pixel" perturbs x~ instead.
White-box (no ZO, the ablation): plain autograd through the API.
prior_tv λ (an addition to the paper, 0 = off): λ · TV(x) is added to what G and z minimise, TV the mean
squared difference of neighbouring pixels of G(z) (both directions), averaged over the batch; its gradient
is exact and costs no query, and it pulls against the high-frequency noise of the zero-order estimate.
prior_diversity λ (an addition, 0 = off): λ · the mean cosine similarity of same-class pairs of G(z) (each image
less its mean pixel value) is added too, against a class's images collapsing to one mode; exact, no query.
boundary_student "clean": s is computed once per step on the clean batch, without a graph, and shared
by every perturbed copy; "perturbed": the student sees each perturbed copy (and, white-box, the
gradient flows through it).
keep_best "batch" (the original) keeps the whole batch of the step whose objective (the scalar minimised,
for ZO the surrogate in the space perturbed) was lowest; "image" keeps each image at the step where its
own loss l_i on the unperturbed batch was lowest.
API-MH with one shared generator (the original): G makes images of the meta model's size and an API of
another size sees a random window of its own size (random_crop_flip's size).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import accel
import network
from core.config import Config, recovery_steps
from core.io import atomic_write
from dataset.augment import random_crop_flip

from .zo import surrogate, zo_grad

EPS = 1e-12     # keeps log p finite when the API is certain


def per_image_loss(scores: torch.Tensor, target: torch.Tensor, student_logits: torch.Tensor | None = None,
                   adv: float = 0.0, distance: str = "l1", logits: bool = False) -> torch.Tensor:
    """CE(scores, y) - adv * m * D(scores, student), per image; m = 1 where both predict the same class.

    scores: the API's probabilities, or its logits (logits=True: CE from them, and D compares logits).
    D: 'l1' = sum |a - s| (black-box path), 'kl' = KL(p || softmax(s)) (white-box path, on probabilities).
    """
    if logits:
        loss = F.cross_entropy(scores, target, reduction="none")
    else:
        loss = -torch.log(scores.gather(1, target[:, None]).squeeze(1) + EPS)
    if student_logits is not None and adv > 0:
        s_logp = F.log_softmax(student_logits, dim=1)
        agree = (scores.argmax(1) == s_logp.argmax(1)).to(scores.dtype)
        if distance == "l1":
            dist = ((scores - student_logits) if logits else (scores - s_logp.exp())).abs().sum(1)
        else:
            probs = F.softmax(scores, dim=1) if logits else scores
            dist = (probs * (torch.log(probs + EPS) - s_logp)).sum(1)
        loss = loss - adv * agree * dist
    return loss


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per image: mean (x[h+1, w] − x[h, w])² + mean (x[h, w+1] − x[h, w])² over its pixels and channels."""
    dh = (x[:, :, 1:] - x[:, :, :-1]).pow(2).flatten(1).mean(1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(1)
    return dh + dw


def class_similarity(x: torch.Tensor, per_class: int) -> torch.Tensor:
    """Per class: the mean cosine similarity of its images' pairs, each image less its own mean pixel value
    (x grouped by class, `per_class` images each); 0 with one image per class."""
    if per_class < 2:
        return x.new_zeros(x.shape[0] // max(per_class, 1))
    v = x.flatten(1)
    v = F.normalize(v - v.mean(1, keepdim=True), dim=1).view(-1, per_class, v.shape[1])
    gram = v @ v.transpose(1, 2)
    return (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (per_class * (per_class - 1))


def recover(api, per_class: int, cfg: Config, *, steps: int | None = None, student=None, adv: float = 0.0,
            generator: torch.Generator | None = None, init: dict | None = None, final: dict | None = None,
            progress: bool = False, stats: dict | None = None,
            image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover `per_class` images for each of the API's classes.

    api: BlackBoxAPI (or anything with .spec, .classes, .device and __call__ on normalized images).
    cfg: the settings read here: ZO, q, mu, numsplit, zo_estimator (the estimator), Glr, zo_space,
        inversion_augment, boundary_student, keep_best; steps defaults to its recovery steps
        (generate_iterations, or meta_generator_steps with meta_generator).
    image_size: the size G makes images at (default the API's; larger: the API sees a random window).
    student: images in [0, 1] -> logits [B, way], the fixed adapted meta model f_theta'; used when adv > 0.
    generator: torch.Generator on the API's device for z, augmentation and ZO directions
        (the generator network's initial weights come from the global RNG).
    init: start from {"generator": a state_dict, "z": [way*per_class, nz]} (either may be absent)
        instead of fresh weights and codes (synthesis/meta_generator.py); fresh ones are drawn anyway.
    final: if a dict is given, filled with {"generator": G's final state_dict, "z": the final codes}.
    stats: if a dict is given, filled with {"best_loss": mean of the kept images' losses, "final_loss"}.
    Returns (images [way*per_class, C, image_size, image_size] in [0, 1], pre-augmentation; relative labels,
    grouped by class).
    """
    if not cfg.ZO and not getattr(api, "white_box", True):
        raise ValueError("white-box recovery (ZO off) needs an API opened with white_box=True; a black-box API "
                         "only answers zero-order queries (ZO on)")
    steps = recovery_steps(cfg) if steps is None else steps
    spec, way = api.spec, len(api.classes)
    device = torch.device(getattr(api, "device", "cpu"))
    n = way * per_class
    target = torch.arange(way, device=device).repeat_interleave(per_class)
    use_student = student is not None and adv > 0
    clean_student = use_student and cfg.boundary_student == "clean"
    normalized = cfg.zo_space == "normalized"
    logits = getattr(api, "output", "probs") == "logits"
    size = image_size or spec.image_size

    G = network.build("generator", image_size=size, channels=spec.channels).to(device)
    G.reset()
    G.train()
    G = accel.fast_layout(G)
    norm = accel.affine_normalizer(spec.mean, spec.std, spec.image_size, device)
    denorm = accel.affine_normalizer(spec.mean, spec.std, spec.image_size, device, inverse=True)
    # d n / d x~ = 1 / std per channel: the chain rule from the normalised to the [0, 1] image
    inv_std = 1.0 / torch.as_tensor(spec.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    z = torch.randn(n, G.nz, device=device, generator=generator)
    if init is not None:
        if "generator" in init:
            G.load_state_dict(init["generator"])
        if "z" in init:
            z = init["z"].to(device, torch.float32).clone()
    z.requires_grad_()
    params = [*G.parameters(), z]
    opt = torch.optim.Adam(params, lr=cfg.Glr, betas=(0.5, 0.999))

    def student_logits(x01: torch.Tensor) -> torch.Tensor:
        # inference_mode: no graph is needed, and it is cheaper than no_grad (bench/RESULTS.md);
        # the clone makes it an ordinary tensor again.
        with torch.inference_mode():
            out = student(x01)
        return out.clone()

    def loss_of(xs: torch.Tensor, s_clean: torch.Tensor | None, normalized: bool) -> torch.Tensor:
        """Black-box loss of k stacked copies of the batch (copy-major), per image."""
        k = xs.shape[0] // n
        probs = api(xs if normalized else norm(xs))
        s_logits = None
        if s_clean is not None:
            s_logits = s_clean if k == 1 else s_clean.repeat(k, 1)
        elif use_student:
            x01 = denorm(xs) if normalized else xs
            # One perturbed copy at a time: a batch-statistics student then normalises with (nearly)
            # the clean batch's statistics whatever numsplit is, in 1/k of the memory.
            s_logits = torch.cat([student_logits(c) for c in x01.split(n)])
        return per_image_loss(probs, target.repeat(k), s_logits, adv, "l1", logits)

    best_loss = torch.full((n,), float("inf"), device=device)
    best_x = torch.zeros(n, spec.channels, size, size, device=device)
    best_objective = float("inf")
    loss = best_loss
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"recover {spec.name}/{getattr(api, 'arch', '?')}", leave=False)
    for _ in it:
        x = G(z)
        xa = random_crop_flip(x, generator=generator, per=cfg.inversion_augment, size=spec.image_size)
        if cfg.ZO:
            xd = xa.detach()
            s_clean = student_logits(xd) if clean_student else None
            xin = accel.fast_layout(norm(xd) if normalized else xd)    # perturbed in the API's layout
            # a perturbed-image student runs functional_call on the meta model: not thread-safe
            g, loss = zo_grad(lambda xs: loss_of(xs, s_clean, normalized), xin, cfg.q, cfg.mu, cfg.numsplit,
                              generator=generator, concurrent=not use_student or clean_student,
                              estimator=cfg.zo_estimator, resolution=cfg.zo_resolution)
            value = (xin.flatten(1) * g.flatten(1)).sum(1).mean() if cfg.keep_best == "batch" else None
            if normalized:
                g = g * inv_std
            objective = surrogate(xa, g)
        else:
            probs = api(norm(xa))
            s_logits = None
            if clean_student:
                with torch.no_grad():
                    s_logits = student(xa)
            elif use_student:
                s_logits = student(xa)
            per_img = per_image_loss(probs, target, s_logits, adv, "kl", logits)
            objective, loss = per_img.mean(), per_img.detach()
            value = objective
        with torch.no_grad():
            if cfg.keep_best == "batch":        # the surrogate's value, in the space it was estimated in
                if float(value) < best_objective:
                    best_objective, best_loss, best_x = float(value), loss, x.detach()
            else:
                better = loss < best_loss
                best_loss = torch.where(better, loss, best_loss)
                best_x = torch.where(better[:, None, None, None], x.detach(), best_x)
        if cfg.prior_tv:
            objective = objective + cfg.prior_tv * total_variation(x).mean()
        if cfg.prior_diversity:
            objective = objective + cfg.prior_diversity * class_similarity(x, per_class).mean()
        # autograd.grad, not backward(): nothing outside G and z (e.g. a student's graph) gets gradients.
        grads = torch.autograd.grad(objective, params)
        for p, gp in zip(params, grads):
            p.grad = gp
        opt.step()
        if progress:
            it.set_postfix(loss=f"{loss.mean().item():.3f}")
    if stats is not None:
        stats["best_loss"] = best_loss.mean().item()
        stats["final_loss"] = loss.mean().item()
    if final is not None:
        final["generator"] = {k: v.detach().clone() for k, v in G.state_dict().items()}
        final["z"] = z.detach().clone()
    return best_x.contiguous(), target


def save_grid(images: torch.Tensor, path: str, per_class: int) -> None:
    """Save images as one picture, one row per class (`per_class` images each); atomic write."""
    from torchvision.utils import save_image
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    ext = {"jpg": "jpeg", "tif": "tiff"}.get(ext, ext)
    atomic_write(path, lambda f: save_image(images.detach().float().cpu(), f, nrow=per_class, padding=2,
                                            format=ext))
