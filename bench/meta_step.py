"""Seconds per API visit (bi-level KD task) and per replay meta-batch, with main.py's flags.

    python bench/meta_step.py --dataset demo --ZO --q 10 --generate_iterations 20 --num_sup_train 1
    python bench/meta_step.py --visits 2 --batches 5 [any main.py flag]

Without --pretrained_path_prefix on the demo data, a throw-away pool of random-weight conv4 APIs is
made in a temp dir (the time of a visit does not depend on what the API learnt). Runs nothing else
of the loop: no evaluation, no checkpoint, nothing written outside the temp dir.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_pool(prefix: str, dataset: str, arch: str, way: int, n: int) -> None:
    from dataset import get_spec
    from network import build
    from synthesis.store import api_path, pool_dir, write_api
    spec = get_spec(dataset)
    d = pool_dir(prefix, dataset, arch, way)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        m = build(arch, way, channels=spec.channels, image_size=spec.image_size)
        write_api({"state_dict": m.state_dict(), "classes": list(range(way * i, way * (i + 1))), "arch": arch,
                    "dataset": dataset, "image_size": spec.image_size, "channels": spec.channels, "way": way,
                    "val_acc": 0.0, "index": i, "seed": 0, "epochs": 0}, api_path(d, i))


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--visits", type=int, default=3)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    own, rest = ap.parse_known_args()
    import torch
    if own.threads:
        torch.set_num_threads(own.threads)
    from main import parse_args
    tmp = tempfile.mkdtemp(prefix="bench_meta_")
    cfg = parse_args([*rest, "--out_dir", os.path.join(tmp, "run")])
    if "--pretrained_path_prefix" not in rest:
        cfg.pretrained_path_prefix = os.path.join(tmp, "pool")
        cfg.APInum = min(cfg.APInum, 4)
        random_pool(cfg.pretrained_path_prefix, cfg.dataset, cfg.pre_backbone, cfg.way_pretrain, cfg.APInum)
    from methods.meta_train import Trainer
    tr = Trainer(cfg)
    sync = (lambda: torch.cuda.synchronize()) if tr.device.type == "cuda" else (lambda: None)

    visit, q0 = [], tr.queries()
    for v in range(own.visits):
        tr.optimizer.zero_grad()
        sync(); t = time.time()
        loss, _ = tr.visit_api(v + 1)
        loss.backward()
        tr.optimizer.step()
        sync(); visit.append(time.time() - t)
    per_visit = (tr.queries() - q0) // max(1, len(visit))
    fill = own.visits
    while tr.memory is not None and not tr.memory.can_sample(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train):
        fill += 1          # each task id draws its own API
        tr.visit_api(fill)    # fill the memory (not timed)
    batch, task_id = [], fill
    for _ in range(own.batches):
        tr.optimizer.zero_grad()
        sync(); t = time.time()
        for _ in range(cfg.episode_batch):
            task_id += 1
            loss, _ = tr.replay(task_id)
            loss.backward()
        tr.optimizer.step()
        sync(); batch.append(time.time() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2]   # noqa: E731
    print(f"device {tr.device}, threads {torch.get_num_threads()}, dataset {cfg.dataset}, "
          f"{'ZO q=%d' % cfg.q if cfg.ZO else 'white-box'}, generate_iterations {cfg.generate_iterations}, "
          f"kd {cfg.num_sup_kd}+{cfg.num_qur_kd}/class, {'first' if cfg.approx else 'second'} order")
    print(f"API visit: median {med(visit):.2f} s over {len(visit)} ({per_visit} queries each)")
    print(f"replay meta-batch ({cfg.episode_batch} tasks, {cfg.way_train}-way {cfg.num_sup_train}-shot "
          f"{cfg.num_qur_train} queries, {cfg.inner_update_num} steps): median {med(batch):.3f} s over {len(batch)}")


if __name__ == "__main__":
    main()
