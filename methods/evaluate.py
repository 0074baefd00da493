"""Evaluation: meta_val and meta_test accuracy on fixed tasks (docs/method.md, "Evaluation").

Each of --episode_test tasks per split (drawn once from --eval_seed) adapts the meta model for
--test_inner_update_num steps on its support set, then scores its query set; the figure is the mean
accuracy with its 95% interval. Under torchrun each process adapts to its share of the tasks (task i on
rank i % N); the accuracies are gathered in task order, so the mean and interval are over the same tasks.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
from torch import nn
from tqdm import tqdm

import accel
from core import dist
from core.config import Config
from core.io import atomic_json
from dataset import MIX_DATASETS, check_episode, fixed_tasks, get_spec, load_split

from . import checkpoint
from .maml import confidence_interval, meta_params, percent, task_hits
from .meta_model import MetaInput


@dataclass
class EvalSplit:
    dataset: str
    split: str          # meta_val | meta_test
    data: object        # dataset.SplitData


def eval_datasets(cfg: Config) -> list[str]:
    return list(MIX_DATASETS) if cfg.mh else [cfg.dataset]


def load_eval_splits(cfg: Config, splits=None) -> list[EvalSplit]:
    """The evaluated splits of each evaluated dataset, checked against the test-task settings."""
    out = []
    for name in eval_datasets(cfg):
        for split in splits or ("meta_val", "meta_test"):
            data = load_split(cfg.data_root, get_spec(name), split)
            check_episode(data, cfg.way_test, cfg.num_sup_test, cfg.num_qur_test, "test")
            out.append(EvalSplit(name, split, data))
    return out


def prepared(task, prep: MetaInput, device) -> tuple:
    """(support x, support y, query x, query y) of a task on the device, images ready for the meta model."""
    t = task.to(device)
    return prep(t.support_x), t.support_y, prep(t.query_x), t.query_y


def evaluate_all(model: nn.Module, cfg: Config, splits: list[EvalSplit], prep: MetaInput, device,
                 ex: accel.TaskExec, procs: dist.Dist = dist.Dist()) -> dict[tuple[str, str], tuple[float, float]]:
    """{(split, dataset): (acc %, 95% CI)} on the fixed tasks; in MH also (split, 'mean')."""
    params = {k: v.detach() for k, v in meta_params(model).items()}
    steps, lr, way = cfg.test_inner_update_num, cfg.inner_lr, cfg.way_test
    mine = [i for i in range(cfg.episode_test) if procs.owns(i)]
    res = {}
    for s in splits:
        tasks = fixed_tasks(s.data, cfg.way_test, cfg.num_sup_test, cfg.num_qur_test, cfg.episode_test,
                            cfg.eval_seed, indices=mine)
        out = accel.map_tasks(ex, model, lambda m, *t: task_hits(m, params, *t, steps=steps, lr=lr, way=way),
                              (prepared(t, prep, device) for t in tasks))
        accs = [percent(o[0]) for o in out]
        res[(s.split, s.dataset)] = confidence_interval(dist.gather_items(dict(zip(mine, accs)), procs).values())
    if cfg.mh:
        for split in dict.fromkeys(s.split for s in splits):
            accs = [res[(split, d)] for d in MIX_DATASETS]
            res[(split, "mean")] = (float(np.mean([a for a, _ in accs])),
                                    float(math.sqrt(sum(c * c for _, c in accs)) / len(accs)))
    return res


def headline(cfg: Config, res: dict, split: str) -> tuple[float, float]:
    """The figure that stands for a split: its dataset's, or the mean over the three in MH."""
    return res[(split, "mean" if cfg.mh else cfg.dataset)]


def evaluate_only(run) -> dict:
    """--evaluate: the meta_test accuracy of a saved model (selection already happened on meta_val), in
    its own run directory (summary.json, metrics.jsonl)."""
    cfg, t = run.cfg, time.time()
    res = evaluate_all(run.model, cfg, run.splits, run.prep, run.device, run.ex, run.procs)
    test, test_ci = headline(cfg, res, "meta_test")
    for (split, ds), (acc, ci) in res.items():
        run.metrics.write({"task": 0, "meta_iter": 0, "split": split, "dataset": ds, "acc": round(acc, 4),
                           "ci": round(ci, 4), "api_queries": 0, "api_visits": 0,
                           "wall_seconds": round(time.time() - t, 2)})
    summary = {"test_acc": test, "test_ci": test_ci, "checkpoint": cfg.evaluate, "way_test": cfg.way_test,
               "num_sup_test": cfg.num_sup_test, "episode_test": cfg.episode_test,
               "wall_seconds": round(time.time() - t, 2), "device": str(run.device)}
    if cfg.mh:
        summary["per_dataset"] = {ds: {"acc": a, "ci": c} for (_, ds), (a, c) in res.items()}
    if run.procs.is_main:
        atomic_json(summary, os.path.join(run.out_dir, "summary.json"))
        print(f"done: {cfg.way_test}-way {cfg.num_sup_test}-shot meta_test {test:.2f} ± {test_ci:.2f} "
              f"({cfg.episode_test} tasks) of {cfg.evaluate} -> {run.out_dir}")
    return summary


# ---------------------------------------------------------------- in a meta-training run (methods/meta_train.py)

def evaluate(run) -> None:
    """Score meta_val and meta_test; log them; keep the model with the best meta_val accuracy (best.pth)."""
    cfg, s, t = run.cfg, run.state, time.time()
    res = evaluate_all(run.model, cfg, run.splits, run.prep, run.device, run.ex, run.procs)
    s.evals += 1
    for (split, ds), (acc, ci) in res.items():
        run.metrics.write({"task": s.task, "meta_iter": s.task // cfg.episode_batch, "split": split, "dataset": ds,
                           "acc": round(acc, 4), "ci": round(ci, 4), "api_queries": run.queries(),
                           "api_visits": s.api_visits, "queries_per_visit": round(run.queries() / max(s.api_visits, 1)),
                           "recovery_steps_per_visit": round(s.recovery_steps / max(s.api_visits, 1), 2),
                           "wall_seconds": round(run.wall(), 2)})
        run.tb.add_scalar(f"eval/{split if ds in ('mean', cfg.dataset) else f'{split}/{ds}'}", acc, s.task)
    (val, val_ci), (test, test_ci) = headline(cfg, res, "meta_val"), headline(cfg, res, "meta_test")
    s.last_res = {f"{k[0]}/{k[1]}": v for k, v in res.items()}
    if val > s.best_val:
        s.best_val, s.best_val_ci, s.best_val_task = val, val_ci, s.task
        s.best_val_test, s.best_val_test_ci, s.best_val_res = test, test_ci, dict(s.last_res)
        checkpoint.save_best(run)
    if test > s.best_test:
        s.best_test, s.best_test_ci, s.best_test_task = test, test_ci, s.task
    run.tb.add_scalar("eval/test_acc_best_on_val", s.best_val_test, s.task)
    run.tb.add_scalar("eval/test_acc_best_on_test (original protocol)", s.best_test, s.task)
    run.tb.add_scalar("eval/seconds", time.time() - t, s.task)
    if run.procs.is_main:
        tqdm.write(f"[task {s.task} | meta-iter {s.task // cfg.episode_batch}] meta_val {val:.2f} ± {val_ci:.2f}  "
                   f"meta_test {test:.2f} ± {test_ci:.2f}  | best on val: test {s.best_val_test:.2f} (task "
                   f"{s.best_val_task})  best on test (original protocol): {s.best_test:.2f}  | visits "
                   f"{s.api_visits} queries {run.queries()}  {run.wall():.0f}s")


def finish(run) -> dict:
    """summary.json (its presence marks a finished run) and the closing line."""
    s, cfg = run.state, run.cfg
    last = {tuple(k.split("/", 1)): tuple(v) for k, v in s.last_res.items()}
    summary = {"test_acc": s.best_val_test, "test_ci": s.best_val_test_ci, "val_acc": s.best_val,
               "val_ci": s.best_val_ci, "best_task": s.best_val_task,
               "last_test_acc": headline(cfg, last, "meta_test")[0] if last else None,
               "test_acc_best_on_test (original protocol)": s.best_test,
               "test_ci_best_on_test (original protocol)": s.best_test_ci,
               "best_on_test_task (original protocol)": s.best_test_task,
               "api_queries": run.queries(), "api_visits": s.api_visits, "tasks": s.task,
               "tasks_run": s.task - cfg.start_id + 1 if cfg.baseline != "random_init" else 0,
               "wall_seconds": round(run.wall(), 2), "device": str(run.device), "baseline": cfg.baseline,
               "processes": run.procs.world}
    if cfg.mh:
        summary["per_dataset_best_on_val"] = {k: {"acc": v[0], "ci": v[1]} for k, v in s.best_val_res.items()}
    run.tb.close()
    if run.procs.is_main:
        atomic_json(summary, os.path.join(run.out_dir, "summary.json"))
        print(f"done: meta_test {summary['test_acc']:.2f} ± {summary['test_ci']:.2f} (model chosen on meta_val "
              f"{summary['val_acc']:.2f}); best on test (original protocol) "
              f"{summary['test_acc_best_on_test (original protocol)']:.2f}; {summary['api_visits']} API visits, "
              f"{summary['api_queries']} queries, {summary['wall_seconds']:.0f}s -> {run.out_dir}")
    return summary
