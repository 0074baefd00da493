"""The four measurements, each a function (Config of a scale, image size, device, plan) -> dict.

Randomly initialised networks and synthetic tensors throughout: no API pool and no dataset are
needed, and speed does not depend on what the weights learnt. APIs are conv4 with random
batch-norm statistics (bench/zo_step.random_api), the meta model a conv4 with batch statistics
(as main.py builds it in API-SS at that image size).

    zo_step       one generator step of data recovery: G(z) -> augment -> (q + 1) API queries per
                  image -> zero-order estimate -> surrogate backward -> Adam (synthesis.recover)
    kd_task       one API visit (methods.kd.kd_task): recover the support set, adapt the meta model
                  (KL, inner_update_num_kd second-order steps), recover the query set with the
                  boundary term, outer KL, backward; run with few generator steps, the recovery's
                  per-step time extrapolated to generate_iterations
    replay_batch  one meta-batch of episode_batch replay tasks (methods.maml.task_loss) run one at a time
                  (executor sequential), one Adam step; and the same meta-batch vmapped (or another executor,
                  backward), timed back to back in each repetition
    eval_task     one test task (methods.maml.task_hits): test_inner_update_num steps on the support
                  set without a graph, query accuracy; and chunks of EVAL_CHUNKS tasks one at a time
                  against one vmapped computation (or other executors), back to back
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import accel
from accel import TaskExec
from bench.measure import MemoryMeter, loadavg, median, repeat, sync
from dataset import Task
from network import build


@dataclass
class Plan:
    """How hard to measure (repetitions per cell, generator steps of a measured API visit)."""
    min_reps: int = 2
    max_reps: int = 7
    budget_s: float = 6.0           # keep repeating a cell while under this (and under max_reps)
    kd_steps: int = 2               # generator steps per recovery in a measured API visit
    kd_reps: int = 1
    warmup: bool = True


def _api(cfg, size: int, device: torch.device, seed: int = 0):
    from bench.zo_step import random_api
    return random_api("conv4", cfg.way_pretrain, size, device, seed)


def _meta_model(cfg, way: int, size: int, device: torch.device):
    from methods.meta_model import MetaInput
    torch.manual_seed(0)
    model = build(cfg.backbone, way, channels=3, image_size=size, batch_stats=True).to(device)
    prep = MetaInput(size, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return model, prep


def _summary(recs: list[dict], device: torch.device) -> dict:
    return {"reps": len(recs), "seconds": round(median(recs, "wall"), 4),
            "seconds_all": [round(r["wall"], 4) for r in recs],
            "cpu_seconds": round(median(recs, "cpu"), 4) if device.type == "cpu" else None}


# ---------------------------------------------------------------- 1. zero-order synthesis step

def zo_step(cfg, size: int, device: torch.device, plan: Plan) -> dict:
    from synthesis.recover import recover
    api = _api(cfg, size, device)
    per_class = max(cfg.num_sup_kd, cfg.num_qur_kd)    # the larger of a visit's two recoveries
    gen = torch.Generator(device=device).manual_seed(0)
    zo = replace(cfg, ZO=True)
    if plan.warmup:     # kernels and allocator; on the CPU at a small geometry (a full step can take a minute)
        small = device.type == "cpu"
        recover(api, min(2, per_class) if small else per_class, replace(zo, q=min(cfg.q, cfg.numsplit)) if small
                else zo, steps=1, generator=gen)
    api.timing = True

    def step():
        q0, api.forward_seconds = api.queries, 0.0
        recover(api, per_class, zo, steps=1, generator=gen)
        return {"images": api.queries - q0, "api_s": api.forward_seconds}

    with MemoryMeter(device) as mem:
        recs = repeat(step, device, min_reps=plan.min_reps, max_reps=plan.max_reps, budget_s=plan.budget_s)
    out = _summary(recs, device)
    images = recs[0]["images"]
    out.update(images_per_step=images, images_per_s=round(images / out["seconds"], 1),
               images_per_cpu_s=round(images / out["cpu_seconds"], 1) if out["cpu_seconds"] else None,
               api_forward_share=round(float(np.median([r["api_s"] / r["wall"] for r in recs])), 3),
               batch=cfg.way_pretrain * per_class, **mem.result())
    return out


# ---------------------------------------------------------------- 2. bi-level KD task (one API visit)

@contextlib.contextmanager
def _timed_recover(device: torch.device, log: list):
    """Time each recover() that methods.kd makes (support, then query)."""
    import methods.kd as kd
    original = kd.recover

    def timed(*a, **k):
        sync(device)
        t = time.perf_counter()
        out = original(*a, **k)
        sync(device)
        log.append(time.perf_counter() - t)
        return out
    kd.recover = timed
    try:
        yield
    finally:
        kd.recover = original


def kd_task(cfg, size: int, device: torch.device, plan: Plan) -> dict:
    from core.config import visit_cost
    from methods.kd import kd_task as run_kd
    from methods.maml import meta_params
    api = _api(cfg, size, device)
    model, prep = _meta_model(cfg, cfg.way_train, size, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.outer_lr)
    steps = min(plan.kd_steps, cfg.generate_iterations)
    s = replace(cfg, ZO=True, generate_iterations=steps, meta_generator=False)
    gen = torch.Generator(device=device).manual_seed(0)
    if plan.warmup:     # every code path once, at a tiny geometry
        tiny = replace(s, num_sup_kd=2, num_qur_kd=2, inner_update_num_kd=1, generate_iterations=1, q=1, numsplit=1)
        run_kd(model, meta_params(model), api, tiny, prep, boundary=True, generator=gen).loss.backward()
    api.timing = True

    def visit():
        log, q0 = [], api.queries
        api.forward_seconds = 0.0
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with _timed_recover(device, log):
            out = run_kd(model, meta_params(model), api, s, prep, boundary=True, generator=gen)
        sync(device)
        t1 = time.perf_counter()
        out.loss.backward()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        return {"support_s": log[0], "query_s": log[1], "adapt_outer_s": t1 - t0 - log[0] - log[1],
                "backward_s": t2 - t1, "queries": api.queries - q0, "api_s": api.forward_seconds}

    with MemoryMeter(device) as mem:
        recs = repeat(visit, device, min_reps=plan.kd_reps, max_reps=plan.kd_reps, budget_s=0)
    out = _summary(recs, device)
    sup, qur = median(recs, "support_s") / steps, median(recs, "query_s") / steps
    rest = median(recs, "adapt_outer_s") + median(recs, "backward_s")
    full = cfg.generate_iterations
    out.update(generator_steps_run=steps, generate_iterations=full,
               support_s_per_step=round(sup, 4), query_s_per_step=round(qur, 4),
               adapt_outer_forward_s=round(median(recs, "adapt_outer_s"), 4),
               backward_s=round(median(recs, "backward_s"), 4),
               api_forward_share=round(float(np.median([r["api_s"] / r["wall"] for r in recs])), 3),
               queries_measured=recs[0]["queries"],
               queries_per_visit=visit_cost(replace(s, generate_iterations=full)),
               extrapolated=steps < full,
               visit_seconds_extrapolated=round((sup + qur) * full + rest, 2),
               boundary=True, **mem.result())
    return out


# ---------------------------------------------------------------- 3. replay meta-batch, 4. evaluation task

def synthetic_task(way: int, shot: int, query: int, size: int, device: torch.device, seed: int) -> Task:
    g = torch.Generator().manual_seed(seed)
    rel = torch.arange(way)
    return Task(torch.rand(way * shot, 3, size, size, generator=g), rel.repeat_interleave(shot),
                torch.rand(way * query, 3, size, size, generator=g), rel.repeat_interleave(query),
                np.arange(way)).to(device)


def _paired(run_a, run_b, device: torch.device, plan: Plan) -> list[dict]:
    """Time two paths back to back in every repetition (alternating which goes first), so that a
    change in the machine's load hits both: records {"a": s, "b": s}."""
    flip = iter(range(10 ** 9))

    def both():
        out = {}
        order = (("a", run_a), ("b", run_b)) if next(flip) % 2 == 0 else (("b", run_b), ("a", run_a))
        for key, fn in order:
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            out[key] = time.perf_counter() - t
        return out
    return repeat(both, device, min_reps=plan.min_reps, max_reps=plan.max_reps, budget_s=2 * plan.budget_s)


def _peak(fn, device: torch.device) -> dict:
    with MemoryMeter(device) as mem:
        fn()
    return mem.result()


def replay_batch(cfg, size: int, device: torch.device, plan: Plan, shot: int, other: TaskExec | None = None) -> dict:
    """One meta-batch of replay tasks, one at a time (executor sequential) and with `other` (default: the
    batch vmapped), timed back to back in each repetition; gradient, then an Adam step."""
    from methods.maml import meta_params, task_loss
    from methods.replay import augmented
    other = other or TaskExec("vmap", cfg.episode_batch)
    model, prep = _meta_model(cfg, cfg.way_train, size, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.outer_lr)
    tasks = [synthetic_task(cfg.way_train, shot, cfg.num_qur_train, size, device, i)
             for i in range(cfg.episode_batch)]
    kw = dict(steps=cfg.inner_update_num, lr=cfg.inner_lr, way=cfg.way_train, first_order=cfg.approx)

    def batch(ex: TaskExec, n: int = cfg.episode_batch):
        opt.zero_grad(set_to_none=True)
        items = [(prep(t.support_x), t.support_y, prep(t.query_x), t.query_y)
                 for t in (augmented(t) if cfg.replay_augment else t for t in tasks[:n])]
        params = meta_params(model)
        for p, g in zip(params.values(), _summed(accel.grad_tasks(ex, model, lambda m, q, *t: task_loss(m, q, *t, **kw),
                                                                  params, items))):
            p.grad = g
        opt.step()

    seq = TaskExec("sequential")
    if plan.warmup:
        batch(seq, 1)
        batch(other, 2)
    mem, mem_other = _peak(lambda: batch(seq), device), _peak(lambda: batch(other), device)
    recs = _paired(lambda: batch(seq), lambda: batch(other), device, plan)
    a, b = median(recs, "a"), median(recs, "b")
    out = {"reps": len(recs), "seconds": round(a, 4), "seconds_all": [round(r["a"], 4) for r in recs],
           "cpu_seconds": None}
    out.update(shot=shot, tasks_per_s=round(cfg.episode_batch / a, 2), second_order=not cfg.approx, **mem,
               other={"executor": str(other), "seconds": round(b, 4), "seconds_all": [round(r["b"], 4) for r in recs],
                      "speedup": round(a / b, 3), "speedups_all": [round(r["a"] / r["b"], 3) for r in recs],
                      **mem_other})
    return out


def _summed(out: list) -> list:
    """Σ over tasks of the gradients accel.grad_tasks returned (None rows: nothing)."""
    total = None
    for _, grads in out:
        if grads is not None:
            total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
    return total


EVAL_CHUNKS = (4, 16)       # tasks per vmapped chunk measured against the one-task path


def eval_task(cfg, size: int, device: torch.device, plan: Plan, shot: int, others=None) -> dict:
    """One test task on the one-task path (executor sequential), then, for each executor of `others`
    (default: vmapped chunks of EVAL_CHUNKS tasks), as many tasks one at a time and with it, back to back in
    each repetition."""
    from methods.maml import meta_params, task_hits
    model, prep = _meta_model(cfg, cfg.way_test, size, device)
    params = {k: v.detach() for k, v in meta_params(model).items()}
    others = [TaskExec("vmap", c) for c in EVAL_CHUNKS] if others is None else others
    n = max((4, *(o.width for o in others)))
    tasks = [synthetic_task(cfg.way_test, shot, cfg.num_qur_test, size, device, i) for i in range(n)]
    items = [(prep(t.support_x), t.support_y, prep(t.query_x), t.query_y) for t in tasks]
    fn = lambda m, *t: task_hits(m, params, *t, steps=cfg.test_inner_update_num, lr=cfg.inner_lr,  # noqa: E731
                                 way=cfg.way_test)
    run = lambda ex, group: accel.map_tasks(ex, model, fn, group)     # noqa: E731
    seq = TaskExec("sequential")
    i = iter(range(10 ** 9))

    def one():
        run(seq, [items[next(i) % 4]])

    if plan.warmup:
        one()
        for o in others:
            run(o, items[:2])
    with MemoryMeter(device) as mem:
        recs = repeat(one, device, min_reps=plan.min_reps, max_reps=3 * plan.max_reps, budget_s=plan.budget_s / 2)
    out = _summary(recs, device)
    out.update(shot=shot, tasks_per_s=round(1 / out["seconds"], 2),
               seconds_600_tasks=round(600 * out["seconds"], 1), **mem.result())
    measured = {}
    for o in others:
        group = items[:max(o.width, 4)]
        m = _peak(lambda: run(o, group), device)
        pr = _paired(lambda: run(seq, group), lambda: run(o, group), device, plan)
        a, b = median(pr, "a") / len(group), median(pr, "b") / len(group)
        measured[str(o)] = {"reps": len(pr), "seq_seconds_per_task": round(a, 4), "seconds_per_task": round(b, 4),
                            "speedup": round(a / b, 3), "speedups_all": [round(r["a"] / r["b"], 3) for r in pr],
                            "seconds_600_tasks_seq": round(600 * a, 1), "seconds_600_tasks": round(600 * b, 1), **m}
    out["others"] = measured
    return out


MEASUREMENTS = {"zo_step": zo_step, "kd_task": kd_task, "replay_batch": replay_batch, "eval_task": eval_task}
SHOTS = {"replay_batch": (1, 5), "eval_task": (1, 5)}


def run_cell(name: str, cfg, size: int, device: torch.device, plan: Plan, shot: int | None = None) -> dict:
    fn = MEASUREMENTS[name]
    load0 = loadavg()
    t = time.perf_counter()
    out = fn(cfg, size, device, plan) if shot is None else fn(cfg, size, device, plan, shot)
    out["cell_wall_s"] = round(time.perf_counter() - t, 1)
    out["loadavg_before"], out["loadavg_after"] = load0, loadavg()
    return out
