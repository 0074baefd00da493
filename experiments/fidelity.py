"""Gradient fidelity: how close is the zero-order estimate to the true gradient? Forward against central
differences, and forward differences along low-resolution directions (--zo_resolution), at equal queries,
along recoveries from demo APIs.

    python -m experiments.fidelity                     # makes the demo data and pool first if missing
    python -m experiments.fidelity --pool PREFIX --data_root DIR --apis 0,1 --seeds 0,1 --qs 20,100 --resolutions 8,4

A recovery runs as `python -m synthesis` runs one: synthesis.recover with the demo preset's settings (q 20,
mu 0.005 or --mu, 40 steps, zo_space normalized, logits answers; the support-set objective CE(API(n_i), y_i),
no boundary term), stepping with the --drive estimator (default forward, the original's). Its zo_grad is
wrapped so that at every step, around that step's normalised batch n and with recover's own per-image loss
l_i, it also takes:

  - the true gradient dl_i/dn_i, by autograd through a white-box copy of the same API network (white-box
    access for this measurement only; the estimates query the black-box API, as recover does);
  - for each q of --qs and each estimator, one more estimate of q + 1 queries per image (forward: q
    directions; central: q/2 pairs; "forward, RxR": q directions drawn at R x R per channel and upsampled,
    for each R of --resolutions), from a generator apart from the recovery's, so the recovery follows
    the same path as without the measurement; at one q both estimators start from the same seed (central's
    directions are forward's first q/2: a paired comparison);
  - at the first step, the same estimators on the linear function <grad l_i, n - n_i> (exact directional
    derivatives, no query, float64): the ceiling that the number of directions alone allows, about
    sqrt(m / (m + d)) for m directions in d = C*H*W dimensions (its distribution depends on m and d only);

and records cos(g_i, grad l_i) per image (both in the space perturbed, n). Writes --out (results/fidelity.json):
per estimator and q the mean, standard deviation and quartiles of the cosine over images x steps x APIs x
seeds, the mean per API and seed and per step, central minus forward on the same image and step, and the
ceiling's mean; with the date, processor, torch version, command and commit.
About 3 minutes (100 s of CPU) on one thread of the 2-core development machine with the defaults; the
demo data and the pool's first two APIs take another 50 s to make if missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.ablation import _run, processor  # noqa: E402

ESTIMATORS = ("forward", "central")


def variants(resolutions: list[int]) -> list[tuple[str, str, int]]:
    """(name, zo_grad estimator, resolution) of every estimate measured."""
    return [(e, e, 0) for e in ESTIMATORS] + [(f"forward, {r}x{r}", "forward", r) for r in resolutions]


class Probe:
    """The API recover is given: every query goes to the black box, as in recover; only a call that asks
    for a gradient (the measurement's) goes to the white-box copy of the same network."""

    white_box = False

    def __init__(self, black, white):
        self.black, self.white = black, white
        self.spec, self.classes, self.device = black.spec, black.classes, black.device
        self.output, self.arch = black.output, black.arch

    def __call__(self, x):
        import torch
        return self.white(x) if torch.is_grad_enabled() and x.requires_grad else self.black(x)


def measure(api, cfg, per_class: int, steps: int, seed: int, qs: list[int], drive: str, api_index: int,
            resolutions: list[int] = ()) -> dict:
    """One recovery; {"cos": {(estimator, q): [step][image] cosines}, "ceiling": {...}, "truth_norm",
    "loss", "white_black_gap"}."""
    import torch
    import torch.nn.functional as F

    import synthesis.recover as rec
    from synthesis.zo import zo_grad

    kinds = variants(list(resolutions))
    out = {"cos": {(e, q): [] for e, _, _ in kinds for q in qs}, "ceiling": {(e, q): [] for e, _, _ in kinds for q in qs},
           "truth_norm": [], "loss": [], "white_black_gap": 0.0}

    def cos(a, b):
        return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)

    def measured(loss_of, x, q, mu, numsplit, generator=None, **kw):
        g, loss = zo_grad(loss_of, x, q, mu, numsplit, generator=generator, **kw)     # the recovery's own step
        step = len(out["loss"])
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_()
            lw = loss_of(xg)                                                        # the white-box copy
            truth = torch.autograd.grad(lw.sum(), xg)[0]          # images are independent: per-image gradients
        out["white_black_gap"] = max(out["white_black_gap"], (lw.detach() - loss).abs().max().item())
        out["loss"].append(loss.mean().item())
        out["truth_norm"].append(truth.flatten(1).norm(dim=1).mean().item())
        x64, t64 = (x.double(), truth.double()) if step == 0 else (None, None)
        for qq in qs:
            for e, estimator, res in kinds:
                # one seed per (api, seed, step, q), the same for every estimator: a paired comparison
                mgen = torch.Generator().manual_seed(((api_index * 1000 + seed) * 1000 + step) * 1000 + qq)
                est, _ = zo_grad(loss_of, x, qq, mu, numsplit, generator=mgen, estimator=estimator, resolution=res)
                out["cos"][(e, qq)].append(cos(est, truth).tolist())
                if step == 0:   # its distribution depends on m and d only (isotropic directions): once a run
                    def linear(xs, x64=x64, t64=t64):
                        k = xs.shape[0] // x64.shape[0]
                        return ((xs - x64.repeat(k, 1, 1, 1)) * t64.repeat(k, 1, 1, 1)).flatten(1).sum(1)
                    lin, _ = zo_grad(linear, x64, qq, mu, numsplit, generator=mgen, estimator=estimator,
                                     resolution=res)
                    out["ceiling"][(e, qq)].append(cos(lin, t64).tolist())
        return g, loss

    cfg = dataclasses.replace(cfg, zo_estimator=drive)
    torch.manual_seed(seed)                         # the generator network's initial weights
    with mock.patch.object(rec, "zo_grad", measured):
        rec.recover(api, per_class, cfg, steps=steps, generator=torch.Generator().manual_seed(seed))
    return out


def stats(values: list[float]) -> dict:
    v = sorted(values)
    n = len(v)
    mean = sum(v) / n
    sd = math.sqrt(sum((a - mean) ** 2 for a in v) / max(1, n - 1))
    q = lambda p: v[min(n - 1, int(p * (n - 1) + 0.5))]  # noqa: E731
    return {"mean": round(mean, 4), "sd": round(sd, 4), "p25": round(q(0.25), 4), "median": round(q(0.5), 4),
            "p75": round(q(0.75), 4), "n": n}


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def ints(s: str) -> list[int]:
    return [int(a) for a in s.split(",") if a.strip()]


def pool_arguments(p: argparse.ArgumentParser, made: str, apis: str, seeds: str) -> None:
    """--pool, --apis and --seeds: which demo APIs a recovery experiment runs on, and its seeds."""
    p.add_argument("--pool", default="./pretrained_blackbox", help=f"--pretrained_path_prefix of a demo pool ({made})")
    p.add_argument("--apis", default=apis, help="indices of the pool's APIs")
    p.add_argument("--seeds", default=seeds, help="recovery seeds (generator init, codes, crops, directions)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.fidelity", description=__doc__.split("\n")[0])
    pool_arguments(p, "made here with `pretrain.py --preset demo` if its APIs are missing", "0,1", "0,1")
    p.add_argument("--data_root", default="./DFL2Ldata", help="the demo data (made here if the pool is missing)")
    p.add_argument("--qs", default="20,100", help="queries per image per step, less the unperturbed one (even)")
    p.add_argument("--steps", type=int, default=None, help="generator steps (default: the demo preset's, 40)")
    p.add_argument("--per_class", type=int, default=2, help="images recovered per class (default 2)")
    p.add_argument("--mu", type=float, default=None, help="smoothing radius (default: the demo preset's, 0.005)")
    p.add_argument("--resolutions", default="", help="R of forward estimates along R x R directions (--zo_resolution)")
    p.add_argument("--drive", choices=ESTIMATORS, default="forward", help="the estimator the recoveries step with")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/fidelity.json")
    a = p.parse_args(argv)
    apis, seeds, qs, resolutions = ints(a.apis), ints(a.seeds), ints(a.qs), ints(a.resolutions)
    if not apis or not seeds or not qs or any(q < 2 or q % 2 for q in qs) or min(apis) < 0:
        p.error("--apis, --seeds and --qs need at least one value each, the APIs' indices at least 0, every q even "
                "and at least 2 (central differences query q/2 pairs)")
    if a.per_class < 1 or (a.steps is not None and a.steps < 1) or (a.mu is not None and a.mu <= 0):
        p.error("--per_class and --steps must be at least 1, --mu more than 0")
    command = "python -m experiments.fidelity" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()

    import torch

    from core.config import build, load_preset
    from synthesis.pool import APIPool
    from synthesis.store import api_files, pool_dir

    torch.set_num_threads(a.threads)
    cfg = build({**load_preset("demo"), **({"mu": a.mu} if a.mu is not None else {})})
    steps = a.steps or cfg.generate_iterations
    data_root, pool = os.path.abspath(a.data_root), os.path.abspath(a.pool)
    made = len(api_files(pool_dir(pool, cfg.dataset, cfg.pre_backbone, cfg.way_pretrain))) <= max(apis)
    if made:
        logs = os.path.join(ROOT, "runs", "fidelity")
        os.makedirs(logs, exist_ok=True)
        print(f"[fidelity] making the demo data in {data_root} and APIs 0..{max(apis)} in {pool}", flush=True)
        _run(["-m", "dataset.demo", "--data_root", data_root], os.path.join(logs, "data.log"), a.threads)
        # API i depends on (api_seed, i) only: these are the demo pool's first APIs
        _run(["pretrain.py", "--preset", "demo", "--APInum", str(max(apis) + 1), "--no-tensorboard",
              "--data_root", data_root, "--pretrained_path_prefix", pool], os.path.join(logs, "pool.log"), a.threads)
    black = APIPool.load(pool, cfg.dataset, cfg.pre_backbone, cfg.way_pretrain, max(apis) + 1, "cpu",
                         output=cfg.api_output, say=lambda m: None)
    white = APIPool.load(pool, cfg.dataset, cfg.pre_backbone, cfg.way_pretrain, max(apis) + 1, "cpu",
                         white_box=True, output=cfg.api_output, say=lambda m: None)

    t0 = time.time()
    runs = []
    for i in apis:
        probe = Probe(black.get(cfg.dataset, cfg.pre_backbone, i), white.get(cfg.dataset, cfg.pre_backbone, i))
        for s in seeds:
            r = measure(probe, cfg, a.per_class, steps, s, qs, a.drive, i, resolutions)
            runs.append((i, s, r))
            line = ", ".join(f"{e} q{q} {stats(sum(r['cos'][(e, q)], []))['mean']:.3f}" for q in qs
                             for e, _, _ in variants(resolutions))
            print(f"[fidelity] API {i} seed {s}: mean cosine {line} ({time.time() - t0:.0f} s)", flush=True)
    spec = black.get(cfg.dataset, cfg.pre_backbone, apis[0]).spec
    d = spec.channels * spec.image_size ** 2

    def every(which: str, key) -> list[float]:
        """All values of one (estimator, q) over runs, steps and images, in one order."""
        return [c for _, _, r in runs for step in r[which][key] for c in step]

    rows = []
    for q in qs:
        for e, estimator, res in variants(resolutions):
            m = q if estimator == "forward" else q // 2
            dims = spec.channels * res * res if res else d
            cosines = every("cos", (e, q))
            diff = [c - f for c, f in zip(cosines, every("cos", ("forward", q)))]   # same image, same step
            rows.append({
                "estimator": e, "q": q, "directions": m, "queries_per_image_per_step": q + 1,
                "cosine": stats(cosines),
                "ceiling_mean": stats(every("ceiling", (e, q)))["mean"],
                "ceiling_formula": round(math.sqrt(m / (m + dims)), 4), "resolution": res, "dims": dims,
                "per_run": [{"api": i, "seed": s, "mean": stats(sum(r["cos"][(e, q)], []))["mean"]}
                            for i, s, r in runs],
                "minus_forward": None if e == "forward" else {
                    "mean": round(sum(diff) / len(diff), 4),
                    "share_higher": round(sum(x > 0 for x in diff) / len(diff), 4)},
                "per_step_mean": [round(stats([c for _, _, r in runs for c in r["cos"][(e, q)][t]])["mean"], 4)
                                  for t in range(steps)],
            })
    result = {
        "about": "docs/queries.md, Gradient fidelity: cosine between the zero-order estimate and the true gradient "
                 "(autograd through a white-box copy of the API) of the per-image loss in the space perturbed, at "
                 "every step of demo recoveries; forward vs central differences, and forward differences along "
                 "low-resolution directions, at equal queries (q + 1 per image per step); experiments/fidelity.py",
        "date": time.strftime("%Y-%m-%d"), "processor": processor(), "torch": torch.__version__,
        "threads": a.threads, "command": command, "commit": _commit(), "seconds": round(time.time() - t0, 1),
        "settings": {"pool": a.pool, "pool_made_here": made, "apis": apis, "seeds": seeds,
                     "steps": steps, "per_class": a.per_class, "images_per_step": a.per_class * cfg.way_pretrain,
                     "drive": f"{a.drive}, q {cfg.q}", "mu": cfg.mu, "zo_space": cfg.zo_space,
                     "api_output": cfg.api_output, "objective": "CE (support set, no boundary term)", "d": d},
        "rows": rows,
        "truth_norm_mean": round(sum(sum(r["truth_norm"]) / steps for _, _, r in runs) / len(runs), 5),
        "loss_first_last": [round(sum(r["loss"][0] for _, _, r in runs) / len(runs), 4),
                            round(sum(r["loss"][-1] for _, _, r in runs) / len(runs), 4)],
        "white_black_loss_gap_max": max(r["white_black_gap"] for _, _, r in runs),
    }
    from core.io import atomic_json
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    atomic_json(result, out)
    for r in rows:
        c = r["cosine"]
        print(f"{r['estimator']:>8} q {r['q']:>4} ({r['directions']} directions): cosine {c['mean']:.3f} "
              f"(sd {c['sd']:.3f}, median {c['median']:.3f}); ceiling {r['ceiling_mean']:.3f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
