"""Data recovery by screening (--recovery screen; an addition to the paper, docs/differences.md B22).

Inversion (synthesis/recover.py) spends (q + 1) queries per image per generator step estimating a gradient,
and within a demo visit's budget ends on low-contrast patterns the API is confident about but no real image
resembles. Screening spends the same queries on labels instead: it draws N candidate images from a
procedural prior that knows nothing of the API or its data, asks the API once about each, and keeps for
every class the candidates with the lowest recovery loss (synthesis/recover.per_image_loss, the boundary
term included when a student is given):

    x_1 .. x_N ~ dead leaves;     l_ic = CE(API(x_i), c) [- adv m_ic D(API(x_i), s_i)]
    class c keeps the per_class candidates of lowest l_ic that no earlier class kept (c = 0, 1, ...)

N = screen_candidates x (images recovered), so a visit costs what an inversion visit would: 0 (the default)
takes (q + 1) x generate_iterations, the inversion's count. No gradient is estimated, nothing is trained.

The prior is the dead-leaves model of natural images: a random background colour, then occluding discs and
squares of random colours, dropped one over the other, their radii of density ∝ 1/r² (small leaves far
more common than large ones, as the objects of natural images). It carries no shape, texture or class
of any dataset; a meta model trained on what the API picks out of it sees colour regions, edges and
occlusion instead of the inversion's patterns. --screen_prior textured (B24) fills each leaf with stripes
or a checkerboard of two random colours (or one colour) and adds pixel noise, so textures join colours.
--screen_spread k (B25) draws each class's images at random from its k x per_class best candidates.
"""
from __future__ import annotations

import torch

from core.config import Config, screen_candidates
from dataset.augment import normalize, resize

from .recover import per_image_loss

LEAVES = 16                 # discs and squares dropped per image (each present with probability 1/2)
RADIUS = (0.03, 0.5)        # radii as fractions of the image side
NOISE = 0.15                # --screen_prior textured: pixel noise, σ uniform on [0, NOISE]
CHUNK = 1000                # candidates rendered and queried at once (memory: CHUNK x C x S x S floats)


def dead_leaves(n: int, size: int, channels: int = 3, generator: torch.Generator | None = None,
                device="cpu", textured: bool = False) -> torch.Tensor:
    """n dead-leaves images [n, channels, size, size] in [0, 1]; every draw from `generator`.

    textured (--screen_prior textured): the background and every leaf are filled with a two-colour texture
    (flat, stripes or a checkerboard, at a random frequency and angle) instead of one colour, and the image
    gets pixel noise of a random strength: the textured dead-leaves of natural-image models."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)
    axis = torch.linspace(0, 1, size, device=device)
    yy, xx = axis[:, None], axis[None, :]
    fill = (lambda: texture(rand, n, channels, xx, yy)) if textured else (lambda: rand(n, channels, 1, 1))
    img = fill().expand(n, channels, size, size).clone()
    lo, hi = RADIUS
    for _ in range(LEAVES):
        present, cx, cy, u, square = rand(n, 1, 1) < 0.5, rand(n, 1, 1), rand(n, 1, 1), rand(n, 1, 1), rand(n, 1, 1)
        r = 1.0 / (1.0 / lo + u * (1.0 / hi - 1.0 / lo))       # 1/r uniform: density ∝ 1/r² on [lo, hi]
        dist = torch.where(square < 0.5, torch.maximum((xx - cx).abs(), (yy - cy).abs()),
                           ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt())
        leaf = ((dist < r) & present).unsqueeze(1)
        img = torch.where(leaf, fill(), img)
    if textured:
        img = (img + NOISE * rand(n, 1, 1, 1) * torch.randn(img.shape, generator=generator, device=device)).clamp(0, 1)
    return img


def texture(rand, n: int, channels: int, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    """n two-colour textures [n, channels, S, S]: a third flat, a third stripes, a third checkerboards,
    2 to 8 cycles across the image at a random angle and phase (xx, yy: the pixel grid in [0, 1])."""
    a, b = rand(n, channels, 1, 1), rand(n, channels, 1, 1)
    kind, freq, angle, p1, p2 = (rand(n, 1, 1) for _ in range(5))
    freq = 2.0 * 4.0 ** freq                                   # log-uniform on [2, 8]
    angle = angle * torch.pi
    u = (xx * angle.cos() + yy * angle.sin()) * freq * 2 * torch.pi
    v = (yy * angle.cos() - xx * angle.sin()) * freq * 2 * torch.pi
    stripes = (u + p1 * 2 * torch.pi).sin()
    checker = stripes * (v + p2 * 2 * torch.pi).sin()
    wave = torch.where(kind < 1 / 3, torch.ones_like(stripes), torch.where(kind < 2 / 3, stripes, checker))
    return torch.where((wave > 0).unsqueeze(1), a, b)


def screen(api, per_class: int, cfg: Config, *, student=None, adv: float = 0.0,
           generator: torch.Generator | None = None, image_size: int | None = None,
           spare: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` images for each of the API's classes, screened from dead-leaves candidates.

    The same contract as synthesis.recover.recover: (images [way*per_class, C, S, S] in [0, 1], relative labels
    grouped by class). student: images in [0, 1] -> logits (the fixed adapted meta model), used when adv > 0;
    it sees the candidates `way * per_class` at a time (its batch statistics then match a recovered set's).
    spare: {"per_class": k} asks for the k next-best distinct candidates of each class besides; filled with
    {"images", "labels"} (grouped by class), at no extra query."""
    spec, way = api.spec, len(api.classes)
    device = torch.device(getattr(api, "device", "cpu"))
    size = image_size or spec.image_size
    n = way * per_class
    extra = spare["per_class"] if spare is not None else 0
    spread = cfg.screen_spread
    keep = way * (per_class * spread + extra)   # per class: enough that the disjoint choice below never runs dry
    total = screen_candidates(cfg) * n
    if total < keep:
        raise ValueError(f"screening {total} candidates cannot give {way} classes {per_class} x {spread} + {extra} "
                         "distinct images each; raise --screen_candidates or lower --screen_spread/--screen_memory")
    logits_out = getattr(api, "output", "probs") == "logits"
    use_student = student is not None and adv > 0
    # Per class, the `keep` best candidates so far, with their indices.
    best_loss = torch.full((way, 0), float("inf"), device=device)
    best_idx = torch.zeros((way, 0), dtype=torch.long, device=device)
    best_x = torch.zeros(way, 0, spec.channels, size, size, device=device)
    chunk = max(n, CHUNK // n * n)      # a multiple of n: the student sees whole sets
    with torch.no_grad():
        for start in range(0, total, chunk):
            m = min(chunk, total - start)
            x = dead_leaves(m, size, spec.channels, generator, device, textured=cfg.screen_prior == "textured")
            x_api = x if size == spec.image_size else resize(x, spec.image_size)
            scores = api(normalize(x_api, spec.mean, spec.std))
            s_logits = torch.cat([student(c) for c in x_api.split(n)]) if use_student else None
            # loss[c, i]: candidate i's loss as an image of class c
            loss = torch.stack([per_image_loss(scores, torch.full((m,), c, device=device), s_logits, adv, "l1",
                                               logits_out) for c in range(way)])
            loss = torch.cat([best_loss, loss], 1)
            idx = torch.cat([best_idx, torch.arange(start, start + m, device=device).expand(way, m)], 1)
            top = loss.topk(min(keep, loss.shape[1]), dim=1, largest=False).indices
            best_x = torch.stack([torch.cat([best_x[c], x])[top[c]] for c in range(way)])
            best_loss, best_idx = loss.gather(1, top), idx.gather(1, top)
    # Classes choose in turn; a candidate an earlier class kept is not offered again (the spares choose after
    # every class has its set). With --screen_spread k a set is drawn at random from the k x per_class best.
    taken, images, spares, ranked = set(), [], [], best_idx.tolist()
    for count, pool, out in ((per_class, per_class * spread, images), (extra, extra, spares)):
        for c in range(way):
            chosen = [j for j, i in enumerate(ranked[c]) if i not in taken][:pool]
            if pool > count:
                pick = torch.randperm(len(chosen), generator=generator, device=device)[:count]
                chosen = [chosen[k] for k in sorted(pick.tolist())]
            taken.update(ranked[c][j] for j in chosen)
            out.append(best_x[c, chosen])
    if spare is not None:
        spare["images"] = torch.cat(spares).contiguous()
        spare["labels"] = torch.arange(way, device=device).repeat_interleave(extra)
    target = torch.arange(way, device=device).repeat_interleave(per_class)
    return torch.cat(images).contiguous(), target

