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
    import accel
    from core.dist import Dist
    from core.device import pick_device
    from core.seeding import task_rng
    from methods.meta_model import build_meta_model, meta_input
    from methods.meta_train import Run, meta_batch, open_pool, visit as run_visit
    device = pick_device(cfg.gpu)
    prep = meta_input(cfg)
    model = build_meta_model(cfg, prep, device)
    run = Run(cfg, Dist(), device, accel.choose(cfg.task_exec, device), prep, [], model,
              torch.optim.Adam(model.parameters(), lr=cfg.outer_lr), cfg.out_dir)
    open_pool(run)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def one_visit(task_id: int) -> None:
        rng = task_rng(cfg.seed, task_id)
        out, r = run_visit(run, task_id, run.pool.pick(rng), rng)
        out.loss.backward()
        run.memory.add(*r["support"])
        run.memory.add(*r["query"])

    visits, q0 = [], run.queries()
    for v in range(own.visits):
        run.optimizer.zero_grad()
        sync(); t = time.time()
        one_visit(v + 1)
        run.optimizer.step()
        sync(); visits.append(time.time() - t)
    per_visit = (run.queries() - q0) // max(1, len(visits))
    fill = own.visits
    while not run.memory.can_sample(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train):
        fill += 1          # each task id draws its own API
        one_visit(fill)    # fill the memory (not timed)
    run.state.visit_next = False
    batch, task_id = [], fill
    for _ in range(own.batches):
        run.optimizer.zero_grad()
        sync(); t = time.time()
        meta_batch(run, list(range(task_id + 1, task_id + cfg.episode_batch + 1)))
        task_id += cfg.episode_batch
        run.optimizer.step()
        sync(); batch.append(time.time() - t)
    med = lambda xs: sorted(xs)[len(xs) // 2]   # noqa: E731
    print(f"device {device}, executor {run.ex}, threads {torch.get_num_threads()}, dataset {cfg.dataset}, "
          f"{'ZO q=%d' % cfg.q if cfg.ZO else 'white-box'}, generate_iterations {cfg.generate_iterations}, "
          f"kd {cfg.num_sup_kd}+{cfg.num_qur_kd}/class, {'first' if cfg.approx else 'second'} order")
    print(f"API visit: median {med(visits):.2f} s over {len(visits)} ({per_visit} queries each)")
    print(f"replay meta-batch ({cfg.episode_batch} tasks, {cfg.way_train}-way {cfg.num_sup_train}-shot "
          f"{cfg.num_qur_train} queries, {cfg.inner_update_num} steps): median {med(batch):.3f} s over {len(batch)}")


if __name__ == "__main__":
    main()
