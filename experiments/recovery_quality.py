"""Recovery quality at equal queries: generator inversion (the original) against screening (--recovery screen),
with either prior (--screen_prior leaves|textured).

    python -m experiments.recovery_quality             # the demo pool's 8 APIs, 8 images per class, seed 0
    python -m experiments.recovery_quality --pool PREFIX --apis 0,1 --per_class 8 --seeds 0,1

Each API of the demo pool gives `per_class` images per class three times, as `python -m synthesis` would, with
the demo preset's settings (q 20, 40 steps: 841 queries per image): once by inversion (synthesis.recover), then
by screening (synthesis.screen) each prior with the same queries. Reported per method, over APIs and seeds:
  target_acc   the share of the images the API assigns to their target class (its argmax), in %
  confidence   the API's mean probability of the target class
  queries      the queries of one recovery (the same for all three, by construction)
  seconds      wall time of one recovery
The API's answers for these two figures are extra queries of the measurement, not of the methods.
Writes --out (results/recovery_quality.json) and --figure (the first API's images, inversion beside
the two screenings, one row per class).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.ablation import processor  # noqa: E402
from experiments.fidelity import _commit, ints, pool_arguments  # noqa: E402

# method -> the flags it runs with
METHODS = {"invert": {"recovery": "invert"}, "screen": {"recovery": "screen"},
           "screen_textured": {"recovery": "screen", "screen_prior": "textured"}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.recovery_quality", description=__doc__.split("\n")[0])
    pool_arguments(p, "bash scriptskd/demo.sh or pretrain.py --preset demo makes one", "0,1,2,3,4,5,6,7", "0")
    p.add_argument("--per_class", type=int, default=8, help="images recovered per class (default 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/recovery_quality.json")
    p.add_argument("--figure", default="docs/figs/recovery_invert_vs_screen.png")
    a = p.parse_args(argv)
    apis, seeds = ints(a.apis), ints(a.seeds)
    if not apis or not seeds or min(apis) < 0 or a.per_class < 1:
        p.error("--apis and --seeds need at least one value each, the APIs' indices at least 0, --per_class at least 1")
    args = argv if argv is not None else sys.argv[1:]
    command = ("python -m experiments.recovery_quality " + " ".join(args)).rstrip()

    import torch
    from dataclasses import replace

    from core.config import build, load_preset
    from core.io import atomic_json
    from dataset import normalize
    from synthesis.api import probabilities
    from synthesis.pool import APIPool
    from synthesis.recover import recover, save_grid
    from synthesis.screen import screen

    torch.set_num_threads(a.threads)
    cfg = build(load_preset("demo"))
    pool = APIPool.load(os.path.abspath(a.pool), cfg.dataset, cfg.pre_backbone, cfg.way_pretrain, max(apis) + 1, "cpu",
                        output=cfg.api_output, say=lambda m: None)
    runs, shown = [], {}
    t0 = time.time()
    for i in apis:
        api = pool.get(cfg.dataset, cfg.pre_backbone, i)
        for s in seeds:
            for method in METHODS:
                torch.manual_seed(s)
                gen = torch.Generator().manual_seed(s)
                before, t = api.queries, time.time()
                flags = METHODS[method]
                run = screen if flags["recovery"] == "screen" else recover
                x, y = run(api, a.per_class, replace(cfg, **flags), generator=gen)
                seconds, queries = time.time() - t, api.queries - before
                with torch.no_grad():
                    pr = probabilities(api, api(normalize(x, api.spec.mean, api.spec.std)))
                runs.append({"api": i, "seed": s, "method": method, "queries": queries, "seconds": round(seconds, 2),
                             "target_acc": round(100 * (pr.argmax(1) == y).float().mean().item(), 2),
                             "confidence": round(pr.gather(1, y[:, None]).mean().item(), 4)})
                if i == apis[0] and s == seeds[0]:
                    shown[method] = x
                print(f"[recovery_quality] API {i} seed {s} {method}: target {runs[-1]['target_acc']:.1f}% confidence "
                      f"{runs[-1]['confidence']:.3f}, {queries} queries ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        rows.append({"method": method, "runs": len(mine), "queries": mine[0]["queries"],
                     "target_acc": round(sum(r["target_acc"] for r in mine) / len(mine), 2),
                     "target_acc_min": min(r["target_acc"] for r in mine),
                     "confidence": round(sum(r["confidence"] for r in mine) / len(mine), 4),
                     "seconds": round(sum(r["seconds"] for r in mine) / len(mine), 2)})
    # one row per class: the inversion's images, then each screening's
    way = len(shown["invert"]) // a.per_class
    rows_of = lambda m, c: shown[m][c * a.per_class:(c + 1) * a.per_class]    # noqa: E731
    grid = torch.cat([torch.cat([rows_of(m, c) for m in METHODS]) for c in range(way)])
    save_grid(grid, a.figure, len(METHODS) * a.per_class)
    out = {"about": "recovery quality at equal queries on the demo pool: generator inversion against screening "
                      "(each prior)",
           "date": time.strftime("%Y-%m-%d"), "processor": processor(), "threads": a.threads,
           "torch": torch.__version__, "command": command, "commit": _commit(), "per_class": a.per_class,
           "apis": apis, "seeds": seeds, "rows": rows, "runs": runs, "figure": a.figure}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_json(out, os.path.abspath(a.out))
    print(f"[recovery_quality] wrote {a.out} and {a.figure}")
    return out


if __name__ == "__main__":
    main()
