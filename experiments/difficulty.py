"""How hard is the demo dataset? Few-shot accuracy on meta_test without and with transferred features.

    python -m experiments.difficulty [--data_root ./DFL2Ldata] [--tasks 200] [--epochs 10] [--out FILE]

Prints, and writes to --out as JSON ({"rows": [{check, shot, acc, ci}], ...}), 5-way accuracy (mean +- 95% CI over fixed tasks, 15 queries per class) of:
  - nearest centroid on raw pixels (1/5-shot);
  - nearest centroid on the features of a random-init conv4 (1/5-shot), and fine-tuning it (1-shot);
  - nearest centroid on the features of a conv4 trained as a 64-way classifier on meta_train (1/5-shot):
    what a model that has learned transferable features can reach.
The 5-way API accuracy is what `python pretrain.py --dataset demo` reports.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import network  # noqa: E402
from dataset import fixed_tasks, get_spec, load_split, normalize, random_crop_flip, train_val_indices  # noqa: E402

SPEC = get_spec("demo")
WAY, QUERY, TASK_SEED = 5, 15, 7


def summary(accs) -> tuple[float, float]:
    """(mean accuracy %, 95% half-width) over tasks."""
    accs = 100 * np.asarray(accs)
    return round(float(accs.mean()), 2), round(float(1.96 * accs.std() / np.sqrt(len(accs))), 2)


def nearest_centroid(embed, data, shot: int, n: int) -> tuple[float, float]:
    """Classify each query by the closest class mean of the support embeddings."""
    accs = []
    with torch.no_grad():
        for t in fixed_tasks(data, WAY, shot, QUERY, n, TASK_SEED):
            f = embed(torch.cat([t.support_x, t.query_x]))
            proto = f[:len(t.support_x)].view(WAY, shot, -1).mean(1)
            pred = torch.cdist(f[len(t.support_x):], proto).argmin(1)
            accs.append((pred == t.query_y).float().mean().item())
    return summary(accs)


def finetune(model, data, shot: int, n: int, steps: int = 10, lr: float = 0.01) -> tuple[float, float]:
    """Adapt all parameters with `steps` SGD steps on the support set (MAML's test-time adaptation)."""
    accs = []
    start = {k: v.detach() for k, v in model.named_parameters()}
    for t in fixed_tasks(data, WAY, shot, QUERY, n, TASK_SEED):
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        xs, xq = normalize(t.support_x, SPEC.mean, SPEC.std), normalize(t.query_x, SPEC.mean, SPEC.std)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, params, (xs,)), t.support_y)
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(params.items(), grads)}
        with torch.no_grad():
            accs.append((functional_call(model, params, (xq,)).argmax(1) == t.query_y).float().mean().item())
    return summary(accs)


def train_64way(data, epochs: int, seed: int = 0):
    """A conv4 trained as a classifier of all meta_train classes (first 80% of each class)."""
    torch.manual_seed(seed)
    model = network.build("conv4", data.num_classes, image_size=SPEC.image_size, batch_stats=True)
    idx, labels, _, _ = train_val_indices(data, list(range(data.num_classes)))
    x, y = data.images(idx), torch.as_tensor(labels)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for b in range(0, len(x), 64):
            i = perm[b:b + 64]
            loss = F.cross_entropy(model(normalize(random_crop_flip(x[i], generator=gen), SPEC.mean, SPEC.std)), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", default="./DFL2Ldata")
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--epochs", type=int, default=10, help="epochs of the 64-way classifier")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/difficulty/results.json", help="the results as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train = load_split(args.data_root, SPEC, "meta_train")
    test = load_split(args.data_root, SPEC, "meta_test")
    n, rows = args.tasks, []

    def record(check: str, shot: int, result: tuple[float, float]) -> None:
        rows.append({"check": check, "shot": shot, "acc": result[0], "ci": result[1]})
        print(f"{check}, {shot}-shot: {result[0]:.1f} +- {result[1]:.1f}%", flush=True)

    torch.manual_seed(0)
    rand = network.build("conv4", WAY, image_size=SPEC.image_size, batch_stats=True)

    def embed(model):
        return lambda x: model.features(normalize(x, SPEC.mean, SPEC.std)).flatten(1)
    for shot in (1, 5):
        record("nearest centroid on raw pixels", shot, nearest_centroid(lambda x: x.flatten(1), test, shot, n))
        record("nearest centroid on a random-init conv4's features", shot, nearest_centroid(embed(rand), test, shot, n))
    record("fine-tuning of a random-init conv4 (10 SGD steps, lr 0.01)", 1, finetune(rand, test, 1, n))
    start = time.time()
    learned = train_64way(train, args.epochs)
    took = time.time() - start
    for shot in (1, 5):
        record(f"nearest centroid on the features of a conv4 trained for {args.epochs} epochs on the 64 meta-train "
               f"classes ({took:.0f} s)", shot, nearest_centroid(embed(learned), test, shot, n))
    from core.io import atomic_json
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_json({"command": "python -m experiments.difficulty " + " ".join(sys.argv[1:]), "tasks": n,
                 "date": time.strftime("%Y-%m-%d"), "rows": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
