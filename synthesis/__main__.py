"""Invert one API of a pool and look at what it gives up.

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

import torch

from .pool import APIPool
from .recover import ZOConfig, affine_normalizer, recover, save_grid


def pick_device(gpu: int | None) -> torch.device:
    """cuda:<gpu> when CUDA is there (default 0), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = 0 if gpu is None else gpu
    if not 0 <= index < torch.cuda.device_count():
        raise SystemExit(f"error: --gpu {index} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m synthesis", description="Recover images from one API of a "
                                "pretrained pool by generator inversion; save them as a grid.")
    p.add_argument("--dataset", default="cifar100", choices=["cifar100", "miniimagenet", "cub", "demo"])
    p.add_argument("--pre_backbone", default="conv4", choices=["conv4", "resnet10", "resnet18"])
    p.add_argument("--api", type=int, default=0, help="index i of model_specific_<i>.pth")
    p.add_argument("--pretrained_path_prefix", default="./pretrained_blackbox")
    p.add_argument("--way_pretrain", type=int, default=5)
    p.add_argument("--ZO", action="store_true", help="black-box: zero-order gradient estimates (else white-box)")
    p.add_argument("--q", type=int, default=100, help="random directions per image per step")
    p.add_argument("--mu", type=float, default=0.005, help="finite-difference smoothing radius")
    p.add_argument("--numsplit", type=int, default=5, help="chunks of the q perturbed copies (memory vs speed)")
    p.add_argument("--generate_iterations", type=int, default=200, help="generator steps")
    p.add_argument("--num_per_class", type=int, default=30, help="images recovered per class")
    p.add_argument("--Glr", type=float, default=1e-3, help="Adam learning rate of generator and codes")
    p.add_argument("--budget", type=int, default=None, help="stop with an error past this many API queries")
    p.add_argument("--compile", action="store_true", help="torch.compile the API forward")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device (default 0; CPU without CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="picture of the recovered images (one row per class)")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    for flag, v in (("--generate_iterations", a.generate_iterations), ("--num_per_class", a.num_per_class),
                    ("--q", a.q), ("--numsplit", a.numsplit)):
        if v < 1:
            raise SystemExit(f"error: {flag} must be at least 1, got {v}")
    if a.mu <= 0:
        raise SystemExit(f"error: --mu must be positive, got {a.mu}")
    device = pick_device(a.gpu)
    torch.manual_seed(a.seed)
    pool = APIPool.load(a.pretrained_path_prefix, a.dataset, a.pre_backbone, a.way_pretrain, a.api + 1, device,
                        white_box=not a.ZO, budget=a.budget, compile=a.compile, say=lambda m: None)
    api = pool.get(a.dataset, a.pre_backbone, a.api)
    zo = ZOConfig(q=a.q, mu=a.mu, numsplit=a.numsplit) if a.ZO else None
    gen = torch.Generator(device=device).manual_seed(a.seed)
    t0 = time.time()
    images, labels = recover(api, a.num_per_class, steps=a.generate_iterations, lr=a.Glr, zo=zo,
                             generator=gen, progress=not a.no_progress)
    seconds = time.time() - t0
    queries = api.queries
    with torch.no_grad():
        norm = affine_normalizer(api.spec.mean, api.spec.std, api.spec.image_size, device)
        pred = api(norm(images)).argmax(1)
    acc = 100.0 * (pred == labels).float().mean().item()
    save_grid(images, a.out, a.num_per_class)
    out = {"target_acc": round(acc, 2), "api_queries": queries, "seconds": round(seconds, 2)}
    print(f"saved {os.path.abspath(a.out)}: {api.way} classes {api.classes} x {a.num_per_class} images "
          f"({'black-box ZO' if a.ZO else 'white-box'})", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
