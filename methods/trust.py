"""Untrusted APIs in the pool (--api_trust agree; an addition to the paper, docs/robustness.md).

At each visit, once its support set S = {(x_i, y_i)} is recovered and before anything else uses it, the
API a is judged from what the run already has: its answers, other APIs of the pool, the task memory.

    sharpness  s = (mean_i max_k p_a(k | x_i) − 1/K) / (1 − 1/K)      its own answers on S (no new query)
    forward    f_y = max_{b ∈ J_y} [ mean_{x ∈ S_y} p_b(y | x) − mean_{x ∈ S∖S_y} p_b(y | x) ]
    reverse    r_y = mean_{b ∈ J_y} [ mean_{x ∈ M_b,y} p_a(y | x) − mean_{x ∈ M_b∖M_b,y} p_a(y | x) ]
    agreement  g = mean of the f_y and r_y there is evidence for          (none yet: no verdict on g)
    trusted    mean s ≥ SHARPNESS_MIN and mean g ≥ AGREEMENT_MIN    (means over this API's visits so far)

J_y: up to api_trust_judges other APIs of the pool that claim class y and are not distrusted, each queried
once on S; M_b: up to |S_y| of the memory's images of each class of judge b that b's visits recovered
(b not visited yet: no r term from it). An honest API's images of y look like y to another API trained on
y (f: the best judge, as some judges may be deceptive themselves), and it tells the images another API
recovered for y from that API's other images (r); a network trained on other classes or an untrained one
does neither, and near-uniform or untrained answers are not sharp (s).
The thresholds were set on recoveries of a 40%-deceptive demo pool with seeds the experiments do not use
(docs/robustness.md). An untrusted visit is dropped (no query set, no outer loss, nothing enters the
memory) and the API distrusted: its later draws are redrawn and its sets already in the memory removed.

The defence only observes until it fires: its draws come from a stream of their own and its queries
change no random state, so a run that trusts every API is the undefended run plus the judges' queries.
"""
from __future__ import annotations

import numpy as np
import torch

from core.config import Config
from dataset import resize

from .kd import api_probs

SHARPNESS_MIN = 0.25
AGREEMENT_MIN = 0.05
STREAM = 0x7275      # the judge's draws: rng (seed, task id, STREAM), apart from the task's own


def _contrast(p_of_y: torch.Tensor, is_y: torch.Tensor) -> float | None:
    if not is_y.any() or is_y.all():
        return None
    return float(p_of_y[is_y].mean() - p_of_y[~is_y].mean())


def owned_images(memory, owner: str, classes, n: int, rng: np.random.Generator) -> dict:
    """{class: up to n of the memory's images of it recovered from API `owner`, in [0, 1]}."""
    out = {}
    for c in classes:
        held = [b for bid, b in memory.items(c) if memory.owner(bid) == owner]
        if held:
            imgs = torch.cat(held)
            pick = np.sort(rng.choice(imgs.shape[0], size=min(n, imgs.shape[0]), replace=False))
            out[c] = imgs[torch.as_tensor(pick)].float().div_(255)
    return out


def make_judge(pool, memory, entry, distrusted, past: dict, cfg: Config, task_id: int):
    """The judgement of one visit to `entry`: a function (api, S images in [0, 1], relative labels, the
    API's probabilities on them) -> the verdict record. past: {"sharpness": [...], "agreement": [...]} of
    the API's earlier visits. The judges are opened and the memory's images
    drawn here, before the task seeds the global RNG (opening an API may draw from it)."""
    rng = np.random.default_rng([cfg.seed, task_id, STREAM])
    classes = list(entry.classes)
    judges = {}                         # J_y
    for c in classes:
        others = [e for e in pool.apis if c in e.classes and e.name != entry.name and e.name not in distrusted]
        take = rng.choice(len(others), size=min(cfg.api_trust_judges, len(others)), replace=False) if others else []
        judges[c] = [others[int(i)] for i in sorted(take)]
    named = {e.name: e for js in judges.values() for e in js}
    opened = {name: pool.open(e) for name, e in named.items()}
    held = {name: owned_images(memory, name, e.classes, cfg.num_sup_kd, rng) for name, e in named.items()}

    def judge(api, x01: torch.Tensor, y: torch.Tensor, probs: torch.Tensor) -> dict:
        y, way = y.cpu(), len(classes)
        sharp = float((probs.max(1).values.mean() - 1 / way) / (1 - 1 / way))
        forward = {name: api_probs(b, resize(x01, b.spec.image_size)).cpu() for name, b in opened.items()}
        reverse = {}
        for name, imgs in held.items():
            if imgs:
                xs = torch.cat(list(imgs.values()))
                reverse[name] = (api_probs(api, resize(xs, api.spec.image_size)).cpu(),
                                 torch.cat([torch.full((len(v),), c) for c, v in imgs.items()]))
        evidence = []
        for rel, c in enumerate(classes):
            f = [_contrast(forward[e.name][:, e.classes.index(c)], y == rel) for e in judges[c]]
            r = [_contrast(reverse[e.name][0][:, rel], reverse[e.name][1] == c) for e in judges[c] if e.name in reverse]
            f, r = [v for v in f if v is not None], [v for v in r if v is not None]
            evidence += ([max(f)] if f else []) + ([float(np.mean(r))] if r else [])
        agree = round(float(np.mean(evidence)), 4) if evidence else None
        sharps = past.get("sharpness", []) + [round(sharp, 4)]
        agrees = past.get("agreement", []) + ([agree] if agree is not None else [])
        trusted = np.mean(sharps) >= SHARPNESS_MIN and (not agrees or np.mean(agrees) >= AGREEMENT_MIN)
        return {"api": entry.name, "sharpness": sharps[-1], "agreement": agree, "evidence": len(evidence),
                "judges": sorted(opened), "visits_judged": len(sharps), "trusted": bool(trusted)}
    return judge
