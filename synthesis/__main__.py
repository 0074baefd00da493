"""Invert (or screen, --recovery screen) one API of a pool and look at what it gives up.

    python -m synthesis --dataset cifar100 --pre_backbone conv4 --api 0 --ZO --out grid.png

Saves the recovered images as a grid (one row per class) and prints one JSON line:
  target_acc   the API's accuracy (%) on the recovered images w.r.t. their target classes
               (un-augmented images, normalized with the API's dataset statistics)
  api_queries  images queried during the inversion (the accuracy check's queries not included)
  seconds      wall time of the inversion
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from core.cli import run
from core.config import Config, check_values, entry_settings, parse
from core.errors import FlagError

FLAGS = entry_settings("synthesis")


def _extra(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("this command")
    g.add_argument("--api", type=int, default=0, help="index i of model_specific_<i>.pth (default: 0)")
    g.add_argument("--num_per_class", type=int, default=30, help="images recovered per class (default: 30)")
    g.add_argument("--compile", action="store_true", help="torch.compile the API forward")
    g.add_argument("--out", default="grid.png", help="picture of the recovered images, one row per class "
                                                     "(default: grid.png)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")


PARSER = dict(prog="python -m synthesis", names=FLAGS, aliases={"query_budget": ("--budget",)}, extra=_extra,
              description="Recover images from one API of a pretrained pool by generator inversion (or, with "
                          "--recovery screen, by screening a procedural prior); save them as a grid.")


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
    return parse(argv, **PARSER)


def main(argv=None) -> dict:
    cfg, a = parse_args(argv)
    check_values(cfg, FLAGS)
    if a.num_per_class < 1 or a.api < 0:
        raise FlagError(f"--num_per_class must be at least 1 and --api at least 0, got {a.num_per_class}, {a.api}")
    if cfg.pre_backbone == "mix" or cfg.dataset == "mix":
        raise FlagError("--dataset and --pre_backbone name one pool folder here; mix is for main.py")
    import torch

    from core.device import pick_device
    from dataset import normalize

    from .pool import APIPool
    from .recover import recover, save_grid
    from .screen import screen
    device = pick_device(cfg.gpu, deterministic=cfg.deterministic)
    torch.manual_seed(cfg.seed)
    pool = APIPool.load(cfg.pretrained_path_prefix, cfg.dataset, cfg.pre_backbone, cfg.way_pretrain, a.api + 1,
                        device, white_box=not cfg.ZO, budget=cfg.query_budget, compile=a.compile, say=lambda m: None)
    api = pool.get(cfg.dataset, cfg.pre_backbone, a.api)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.time()
    if cfg.recovery == "screen":
        images, labels = screen(api, a.num_per_class, cfg, generator=gen)
    else:
        images, labels = recover(api, a.num_per_class, cfg, generator=gen, progress=not a.no_progress)
    seconds = time.time() - t0
    queries = api.queries
    with torch.no_grad():
        pred = api(normalize(images, api.spec.mean, api.spec.std)).argmax(1)
    acc = 100.0 * (pred == labels).float().mean().item()
    save_grid(images, a.out, a.num_per_class)
    out = {"target_acc": round(acc, 2), "api_queries": queries, "seconds": round(seconds, 2)}
    how = "screened" if cfg.recovery == "screen" else "black-box ZO" if cfg.ZO else "white-box"
    print(f"saved {os.path.abspath(a.out)}: {api.way} classes {api.classes} x {a.num_per_class} images ({how})",
          file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run(main)
