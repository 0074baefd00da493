"""Pretrain the pool of APIs: each API is a classifier on `way` classes of a
dataset's meta-train split, later served to meta-training as a black box.

    pool dir = <prefix>/<dataset>/<arch>/meta_train/<way>way/model/
    API i    = model_specific_<i>.pth (best-validation weights + what they were trained on)
    summary  = pool.json, [{"index", "classes", "val_acc", "arch", "dataset"}, ...]

The pool is resumable (a finished API is a complete file; files are written under a temporary
name and renamed) and shardable (under torchrun, rank r trains the APIs i with i % world == r).
API i's classes and initial weights depend only on (api_seed, i), whichever process trains it.
File layout and reading: synthesis/store.py.
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import network
from core.config import FIELDS, PRETRAIN_SETTINGS, Config, check_values
from core.device import pick_device
from core.dist import Dist
from core.errors import DataError, FlagError, PoolError
from core.io import atomic_text
from dataset import DatasetSpec, get_spec, load_split, normalize, random_crop_flip, train_val_indices
from dataset.split import load_images
from synthesis.store import api_files, api_path, pool_dir, read_meta, write_api

GRAD_CLIP = 50.0
LR_MILESTONES = {"conv4": (70,), "resnet": (30, 50, 80)}     # lr x LR_GAMMA at these epochs (the original's)
LR_GAMMA = 0.2
EVAL_BATCH = 512
# Settings an API file records as they are (tagged pool_file in core/config.py), and what files written
# before each existed were trained with. With what expected_identity derives, they define a pool: an existing
# API file that differs in any of them belongs to another pool.
POOL_SETTINGS = {k: f.metadata["pool_file"]["before"] for k, f in FIELDS.items() if "pool_file" in f.metadata}


@dataclass
class APIData:
    """One API's images, already on the device: train/val in [0, 1], labels relative (0..way-1)."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    spec: DatasetSpec = field(repr=False)


# ----------------------------------------------------------------------------- paths and seeds

def api_classes(seed: int, index: int, num_classes: int, way: int) -> list[int]:
    """The meta-train classes of API `index`: `way` distinct ids, sorted, a function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    return sorted(int(c) for c in rng.choice(num_classes, way, replace=False))


def api_torch_seed(seed: int, index: int) -> int:
    """Seed for API `index`'s initial weights, minibatch order and augmentation."""
    return int(np.random.SeedSequence([seed, index, 1]).generate_state(1)[0])


def resolve_epochs(cfg: Config, spec: DatasetSpec) -> int:
    return spec.pretrain_epochs if cfg.epochs is None else cfg.epochs


# ----------------------------------------------------------------------------- data

def api_data(data, classes: list[int], device: torch.device, workers: int = 0) -> APIData:
    """The images of `classes` (first 80% per class train, last 20% validate), on the device."""
    tr, trl, va, val = train_val_indices(data, classes)
    to = lambda a: torch.as_tensor(a).to(device)  # noqa: E731
    return APIData(load_images(data, tr, workers).to(device), to(trl),
                   load_images(data, va, workers).to(device), to(val), data.spec)


# ----------------------------------------------------------------------------- training one API

def make_optimizer(arch: str, model: nn.Module, lr: float | None):
    """The original's: conv4 Adam(lr 0.01), x0.2 at epoch 70; resnets SGD(lr 0.01, momentum 0.9,
    weight decay 5e-4), x0.2 at epochs 30/50/80."""
    lr = 0.01 if lr is None else lr
    if arch == "conv4":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    milestones = LR_MILESTONES["conv4" if arch == "conv4" else "resnet"]
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=LR_GAMMA)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: DatasetSpec) -> float:
    """Accuracy (percent) of the model in eval mode (running BN statistics) on unaugmented images."""
    model.eval()
    correct = 0
    for b in range(0, len(x), EVAL_BATCH):
        logits = model(normalize(x[b:b + EVAL_BATCH], spec.mean, spec.std))
        correct += (logits.argmax(1) == y[b:b + EVAL_BATCH]).sum().item()
    return 100.0 * correct / max(1, len(x))


def train_epoch(model, opt, d: APIData, batch_size: int, gen: torch.Generator, augment: bool = False) -> float:
    """One pass over the training images in a random order; returns the mean loss.
    augment: random crop/flip of each batch (the original trains on the plain images)."""
    model.train()
    perm = torch.randperm(len(d.train_x), device=d.train_x.device, generator=gen)
    total, seen = 0.0, 0
    for b in range(0, len(perm), batch_size):
        idx = perm[b:b + batch_size]
        if len(idx) < 2:        # a lone image gives degenerate batch-norm statistics
            continue
        x = d.train_x[idx]
        x = normalize(random_crop_flip(x, generator=gen) if augment else x, d.spec.mean, d.spec.std)
        loss = F.cross_entropy(model(x), d.train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(1, seen)


def train_api(arch: str, way: int, d: APIData, *, epochs: int, batch_size: int, lr: float | None,
              seed: int, init: str = "original", augment: bool = False, patience: int | None = None,
              desc: str = "", position: int = 1, show: bool = True, writer=None) -> tuple[dict, float, int]:
    """Train one API; returns (best-validation state dict on the CPU, its accuracy when reloaded, best epoch).

    patience: stop after this many epochs without a better validation accuracy (None: never).
    The best state is a deep copy taken at the best epoch: keeping `model.state_dict()` itself
    would keep references to the live tensors and silently save the last epoch.
    """
    device = d.train_x.device
    torch.manual_seed(seed)
    model = network.build(arch, way, channels=d.spec.channels, image_size=d.spec.image_size, init=init).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    opt, sched = make_optimizer(arch, model, lr)
    best_acc, best_epoch, best_state = -1.0, -1, None
    bar = tqdm(range(epochs), desc=desc, position=position, leave=False, dynamic_ncols=True, disable=not show)
    for epoch in bar:
        loss = train_epoch(model, opt, d, batch_size, gen, augment)
        sched.step()
        acc = evaluate(model, d.val_x, d.val_y, d.spec)
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{acc:.1f}%", best=f"{best_acc:.1f}%")
        if writer is not None:
            writer.add_scalar("loss/train", loss, epoch)
            writer.add_scalar("acc/val", acc, epoch)
        if patience is not None and epoch - best_epoch >= patience:
            break
    bar.close()
    if best_state is None:      # epochs == 0: the untrained weights are all there is
        best_state, best_epoch = copy.deepcopy(model.state_dict()), -1
    model.load_state_dict(best_state)
    val_acc = evaluate(model, d.val_x, d.val_y, d.spec)     # what the saved weights really score
    return {k: v.detach().cpu() for k, v in best_state.items()}, val_acc, best_epoch


# ----------------------------------------------------------------------------- files

def save_summary(rows: list[dict], path: str) -> None:
    """pool.json: a JSON list, one API per line."""
    atomic_text("[\n" + ",\n".join(" " + json.dumps(r) for r in rows) + "\n]\n", path)


def expected_identity(cfg: Config, spec: DatasetSpec, index: int) -> dict:
    return {"dataset": spec.name, "arch": cfg.pre_backbone, "way": cfg.way_pretrain,
            "classes": api_classes(cfg.api_seed, index, spec.classes_in("meta_train"), cfg.way_pretrain),
            "image_size": spec.image_size, "channels": spec.channels, "epochs": resolve_epochs(cfg, spec),
            **{k: getattr(cfg, k) for k in POOL_SETTINGS}}


def check_api_file(path: str, cfg: Config, spec: DatasetSpec, index: int) -> dict:
    """Metadata of an existing API file; raises one clear error if it belongs to another pool."""
    meta = read_meta(path)
    want = expected_identity(cfg, spec, index)
    held = {k: meta.get(k, POOL_SETTINGS.get(k)) for k in want}
    diff = [f"{k} {held[k]!r} (asked: {want[k]!r})" for k in want if held[k] != want[k]]
    if diff:
        hint = (f" (it was trained with --seed {meta.get('seed')})"
                if any(d.startswith("classes") for d in diff) and meta.get("seed") != cfg.api_seed else "")
        raise PoolError(f"{path} was trained with other settings: {'; '.join(diff)}{hint}. Pools are never "
                        f"mixed: pass another --pretrained_path_prefix, or delete {os.path.dirname(path)} "
                        "to retrain it")
    return meta


def scan_pool(folder: str, cfg: Config, spec: DatasetSpec) -> dict[int, dict]:
    """{index: metadata} of every API file in the folder, each checked against the settings."""
    return {i: check_api_file(api_path(folder, i), cfg, spec, i) for i in api_files(folder)}


def summary_rows(metas: dict[int, dict]) -> list[dict]:
    return [{"index": i, "classes": m["classes"], "val_acc": m["val_acc"], "arch": m["arch"],
             "dataset": m["dataset"]} for i, m in sorted(metas.items())]


def format_table(rows: list[dict]) -> str:
    """The pool summary printed at the end: one line per API, then mean/min/max accuracy."""
    lines = [f"{'api':>5}  {'val acc':>8}  classes"]
    lines += [f"{r['index']:>5}  {r['val_acc']:7.2f}%  {r['classes']}" for r in rows]
    accs = np.array([r["val_acc"] for r in rows], dtype=float)
    if len(accs):
        lines.append(f"{len(accs)} APIs: mean {accs.mean():.2f}%  min {accs.min():.2f}%  max {accs.max():.2f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the pool

def pretrain_one(cfg: Config, data, index: int, device: torch.device, dist: Dist,
                 folder: str, position: int = 1) -> dict:
    """Train API `index` and write its file; returns the checkpoint metadata."""
    spec = data.spec
    ident = expected_identity(cfg, spec, index)
    t0 = time.time()
    d = api_data(data, ident["classes"], device, cfg.workers)
    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(folder, "tensorboard", f"api_{index}"))
    seed = api_torch_seed(cfg.api_seed, index)
    try:
        state, val_acc, best_epoch = train_api(
            cfg.pre_backbone, cfg.way_pretrain, d, epochs=ident["epochs"], batch_size=cfg.batch_size, lr=cfg.lr,
            seed=seed, init=cfg.init, augment=cfg.api_augment, patience=cfg.api_patience,
            desc=f"api {index}", position=position, show=dist.rank == 0, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    ckpt = {"state_dict": state, **ident, "stem_relu": False, "val_acc": val_acc, "index": index, "seed": cfg.api_seed,
            "best_epoch": best_epoch, "lr": 0.01 if cfg.lr is None else cfg.lr, "batch_size": cfg.batch_size,
            "num_train": len(d.train_x), "num_val": len(d.val_x),
            "trained_by": {"rank": dist.rank, "world_size": dist.world, "device": str(device)},
            "train_seconds": round(time.time() - t0, 2)}
    write_api(ckpt, api_path(folder, index))
    ckpt.pop("state_dict")
    return ckpt


def wait_for(paths: list[str], poll: float = 2.0) -> None:
    """Block until every path exists (the other ranks' APIs). If a rank dies, torchrun stops us too."""
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing:
            return
        time.sleep(poll)


def pretrain_pool(cfg: Config, dist: Dist | None = None, say=print) -> list[dict] | None:
    """Train the pool's missing APIs (this rank's share) and, on rank 0, write pool.json.

    Returns the summary rows on rank 0, None on the other ranks.
    """
    dist = dist or Dist.from_env()
    spec = get_spec(cfg.dataset)
    if cfg.pre_backbone not in network.ARCHS:
        raise FlagError(f"pre_backbone {cfg.pre_backbone!r} cannot be pretrained; choose one of "
                        f"{', '.join(network.ARCHS)} (pools for API-SH/MH are one pretrain.py run per architecture)")
    check_values(cfg, PRETRAIN_SETTINGS)
    data = load_split(cfg.data_root, spec, "meta_train")
    if data.num_classes < cfg.way_pretrain:
        raise DataError(f"{spec.name} meta_train has {data.num_classes} classes, fewer than "
                        f"way_pretrain {cfg.way_pretrain}; lower way_pretrain or check the split CSV")
    if data.num_classes != spec.classes_in("meta_train"):
        raise DataError(f"{spec.name} meta_train has {data.num_classes} classes, expected "
                        f"{spec.classes_in('meta_train')}; rerun `{spec.filelist_script}`")
    folder = pool_dir(cfg.pretrained_path_prefix, spec.name, cfg.pre_backbone, cfg.way_pretrain)
    os.makedirs(folder, exist_ok=True)
    done = scan_pool(folder, cfg, spec)     # raises before any training if the folder is another pool's
    device = pick_device(cfg.gpu, local_rank=dist.local_rank, world=dist.world,
                         say=say if dist.rank == 0 else None,
                         deterministic=cfg.deterministic)
    mine = [i for i in range(cfg.APInum) if dist.owns(i)]
    todo = [i for i in mine if i not in done]
    tag = f"[rank {dist.rank}/{dist.world}] " if dist.world > 1 else ""
    say(f"{tag}{folder}: {len(mine) - len(todo)} of this process's {len(mine)} API(s) already trained, "
        f"training {len(todo)} ({cfg.pre_backbone}, {cfg.way_pretrain}-way, {resolve_epochs(cfg, spec)} epochs, {device})")
    # Under torchrun only rank 0 draws bars (the others' would garble the terminal); every rank
    # prints one line per finished API.
    pool_bar = tqdm(todo, desc=f"{tag}pool", position=0, dynamic_ncols=True, disable=dist.rank != 0 or not todo)
    for i in pool_bar:
        meta = pretrain_one(cfg, data, i, device, dist, folder)
        pool_bar.set_postfix(last=f"api {i}: {meta['val_acc']:.1f}%")
        tqdm.write(f"{tag}api {i}: val acc {meta['val_acc']:.2f}% (best epoch {meta['best_epoch'] + 1}"
                   f"/{meta['epochs']}, {meta['train_seconds']:.1f} s) classes {meta['classes']}")
    pool_bar.close()

    if dist.rank != 0:
        return None
    others = [api_path(folder, i) for i in range(cfg.APInum)]
    if not all(os.path.exists(p) for p in others):
        say(f"{tag}waiting for the other processes' APIs")
        wait_for(others)
    rows = summary_rows(scan_pool(folder, cfg, spec))
    save_summary(rows, os.path.join(folder, "pool.json"))
    say(format_table(rows))
    say(f"pool of {len(rows)} API(s) in {folder} (summary: pool.json)")
    return rows
