"""What a whole main.py run will cost, before running it: `python -m bench --estimate -- <main.py flags>`.

    python -m bench --estimate -- --preset paper_ss
    python -m bench --estimate --threads 1 -- --preset demo
    python -m bench --estimate --visits demo -- --preset paper_mh --num_sup_train 5

Measured on the current device, on random weights and synthetic images (bench/suite.py): one
generator step of the support-set recovery and of the boundary query-set recovery, one adaptation
(inner loop, outer loss, backward), one replay meta-batch and one evaluation task. Extrapolated from
them, by counting what the run does with these flags:

    visit       = generate_iterations · (support step + query step) + adaptation
    API visits  = V visits                                    (V: the assumption below)
    replay      = (tasks − V) / episode_batch · replay meta-batch
    evaluation  = evaluations · splits · episode_test · evaluation task
    checkpoints = bytes written / measured write speed        (model, Adam state, new memory files)

How many tasks are API visits depends on training accuracy (the trigger), so V is an assumption:
`bound` (default) the most the trigger allows, one visit per generate_interval + 1 meta-batches
(after the visits the memory needs to serve its first task); `demo` the rate the demo run showed,
9 visits in 100 meta-batches with generate_interval 4, i.e. one visit per 2.2 · (generate_interval + 1)
meta-batches; or a number. A --query_budget caps V.

Printed: the measurements, the projection per stage (each line says what is measured and what is
extrapolated), and as the last line one JSON object with at least wall_hours, peak_mem_gb, disk_gb
and api_visits.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

import torch

import accel
from bench.measure import MemoryMeter, environment, loadavg, median, repeat, sync
from bench.suite import Plan, eval_task, replay_batch

DEMO_VISITS, DEMO_META_BATCHES, DEMO_INTERVAL = 9, 100, 4     # the demo run (config/demo.py), README
DEMO_SPACING = DEMO_META_BATCHES / DEMO_VISITS / (DEMO_INTERVAL + 1)      # 2.2: its visits per (g + 1)
ARCH_FOR_MIX = ("conv4", "resnet10", "resnet18")


def _log(msg: str) -> None:
    print(f"[estimate] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- what a run does with these flags

def geometry(cfg) -> dict:
    """API image sizes (with their draw weights), API architectures, the meta model's input, classes."""
    from dataset.specs import MIX_DATASETS, MIX_IMAGE_SIZE, MIX_NUM_CLASSES, get_spec
    if cfg.mh:
        sizes = {}
        for d in MIX_DATASETS:
            s = get_spec(d).image_size
            sizes[s] = sizes.get(s, 0.0) + 1.0 / len(MIX_DATASETS)
        return {"api_sizes": sizes, "meta_size": MIX_IMAGE_SIZE, "classes": MIX_NUM_CLASSES,
                "eval_datasets": len(MIX_DATASETS),
                "archs": ARCH_FOR_MIX}
    spec = get_spec(cfg.dataset)
    return {"api_sizes": {spec.image_size: 1.0}, "meta_size": spec.image_size, "classes": spec.num_classes[0],
            "eval_datasets": 1, "archs": ARCH_FOR_MIX if cfg.pre_backbone == "mix" else (cfg.pre_backbone,)}


def count_visits(cfg, assumption: str) -> tuple[int, str]:
    """(API visits, how the number was reached)."""
    from core.config import visit_cost
    tasks = cfg.episode_train - cfg.start_id + 1
    batches = math.ceil(tasks / cfg.episode_batch)
    first = math.ceil(cfg.way_train / cfg.way_pretrain)        # the memory must hold way_train classes
    g = cfg.generate_interval
    if assumption == "bound":
        v = first + (batches - 1) // (g + 1)
        why = (f"bound: the trigger allows at most one visit per generate_interval + 1 = {g + 1} meta-batches "
               f"({batches} meta-batches), after {first} to fill the memory")
    elif assumption == "demo":
        v = max(first, round(batches / (DEMO_SPACING * (g + 1))))
        why = (f"the demo's rate: {DEMO_VISITS} visits in {DEMO_META_BATCHES} meta-batches with generate_interval "
               f"{DEMO_INTERVAL}, one per {DEMO_SPACING:.1f} x (generate_interval + 1) meta-batches, scaled to "
               f"generate_interval {g}")
    else:
        v, why = int(assumption), "given (--visits)"
    if cfg.query_budget is not None:
        cap = cfg.query_budget // visit_cost(cfg)
        if v > cap:
            v, why = cap, why + f"; capped by --query_budget {cfg.query_budget} ({visit_cost(cfg)} queries a visit)"
    return max(1, min(v, tasks)), why


def count_evaluations(cfg) -> int:
    tasks = cfg.episode_train - cfg.start_id + 1
    return tasks // cfg.val_interval + (1 if tasks % cfg.val_interval else 0)


def count_saves(cfg) -> int:
    tasks = cfg.episode_train - cfg.start_id + 1
    return tasks // cfg.save_interval + (1 if tasks % cfg.save_interval else 0)


# ---------------------------------------------------------------- measurements

def _time(fn, device, reps: int) -> dict:
    with MemoryMeter(device) as mem:
        recs = repeat(lambda: fn() and None, device, min_reps=reps, max_reps=reps, budget_s=0)
    return {"seconds": round(median(recs, "wall"), 4), "reps": len(recs), **mem.result()}


def _student(cfg, meta_size: int, device):
    """The boundary term's student: the meta model at its input size, parameters fixed."""
    from methods.kd import bounded_student
    from methods.maml import forward, meta_params
    from methods.meta_model import MetaInput
    from network import build
    torch.manual_seed(0)
    model = build(cfg.backbone, cfg.way_train, channels=3, image_size=meta_size, batch_stats=True,
                  pool="max" if cfg.mh else "flatten").to(device, memory_format=torch.channels_last)
    prep = MetaInput(meta_size, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    fixed = {k: v.detach() for k, v in meta_params(model).items()}
    return bounded_student(lambda x01: forward(model, fixed, prep(x01), cfg.way_pretrain),
                           cfg.way_pretrain * cfg.num_qur_kd)


def recovery_steps(cfg, size: int, arch: str, meta_size: int, device, reps: int) -> dict:
    """Seconds of one generator step: support recovery, and query recovery with the boundary term."""
    from bench.zo_step import random_api
    from dataclasses import replace

    from synthesis.recover import recover
    api = random_api(arch, cfg.way_pretrain, size, device, 0, white_box=not cfg.ZO)
    gen = torch.Generator(device=device).manual_seed(0)
    student = _student(cfg, meta_size, device)
    tiny = replace(cfg, q=1, numsplit=1)        # kernels and allocator, once
    recover(api, 1, tiny, steps=1, generator=gen)
    recover(api, 1, tiny, steps=1, generator=gen, student=student, adv=cfg.adv)

    def support(steps):
        return lambda: recover(api, cfg.num_sup_kd, cfg, steps=steps, generator=gen)

    def query(steps):
        return lambda: recover(api, cfg.num_qur_kd, cfg, steps=steps, generator=gen, student=student, adv=cfg.adv)
    def timed(fn) -> dict:
        api.timing, api.forward_seconds = True, 0.0
        m = _time(fn, device, reps)
        m["api_s"] = api.forward_seconds / reps
        api.timing = False
        return m

    # a recovery = set-up (a fresh generator, latent codes) + steps: time both, report the step alone
    setup = _time(support(0), device, reps)
    sup, qry = timed(support(1)), timed(query(1))
    for m in (sup, qry):
        m["seconds"] = round(max(m["seconds"] - setup["seconds"], 1e-6), 4)
        m["api_share"] = round(min(1.0, m.pop("api_s") / m["seconds"]), 3)
    return {"support_step": sup, "query_step": qry, "setup": setup}


def adaptation(cfg, meta_size: int, device, reps: int) -> dict:
    """One visit's bi-level part: the inner KL steps on the support set, the outer KL, backward."""
    from methods.maml import adapt, forward, kl_loss, meta_params
    from methods.meta_model import MetaInput
    from network import build
    torch.manual_seed(0)
    model = build(cfg.backbone, cfg.way_train, channels=3, image_size=meta_size, batch_stats=True,
                  pool="max" if cfg.mh else "flatten").to(device, memory_format=torch.channels_last)
    prep = MetaInput(meta_size, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    way = cfg.way_pretrain
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(way * cfg.num_sup_kd, 3, meta_size, meta_size, generator=g).to(device)
    xq = torch.rand(way * cfg.num_qur_kd, 3, meta_size, meta_size, generator=g).to(device)
    ps = torch.softmax(torch.randn(xs.shape[0], way, generator=g), 1).to(device)
    pq = torch.softmax(torch.randn(xq.shape[0], way, generator=g), 1).to(device)

    def one(n: int | None = None, steps: int = cfg.inner_update_num_kd):
        params = meta_params(model)
        adapted = adapt(model, params, prep(xs[:n]), ps[:n], kl_loss, steps, cfg.inner_lr, way=way,
                        first_order=cfg.approx, recompute=not cfg.approx)     # as methods/kd.py
        kl_loss(forward(model, adapted, prep(xq[:n]), way), pq[:n]).backward()
        model.zero_grad(set_to_none=True)
    one(2 * way, min(1, steps := cfg.inner_update_num_kd))     # kernels and allocator, on a few images
    return _time(lambda: one(None, steps), device, reps)


def write_speed(folder: str | None = None, mb: int = 64) -> float:
    """MB/s of an atomic, fsync'ed torch.save (the checkpoints' writer) in a temporary folder."""
    from core.io import atomic_torch_save
    with tempfile.TemporaryDirectory(dir=folder) as d:
        x = torch.randint(0, 255, (mb * 2 ** 20,), dtype=torch.uint8)
        t = time.perf_counter()
        atomic_torch_save({"x": x}, os.path.join(d, "w.pt"))
        return mb / max(time.perf_counter() - t, 1e-6)


# ---------------------------------------------------------------- the projection

def estimate(flags: list[str], device, *, visits: str = "bound", quick: bool = False) -> dict:
    from core.config import visit_cost
    from main import parse_args
    cfg = parse_args(flags)
    geo = geometry(cfg)
    meta = geo["meta_size"]
    reps = 1 if quick else 2
    plan = Plan(min_reps=1, max_reps=1 if quick else 3, budget_s=0.0 if quick else 4.0)
    t0 = time.perf_counter()
    load0 = loadavg()

    # recovery: conv4 APIs at every API image size; other architectures scale the step by their forward
    steps = {}
    for size in geo["api_sizes"]:
        _log(f"recovery steps, {size}x{size} conv4 API ({cfg.way_pretrain} x {cfg.num_sup_kd}/{cfg.num_qur_kd} images, "
             f"q {cfg.q if cfg.ZO else '-'})")
        steps[size] = recovery_steps(cfg, size, "conv4", meta, device, reps)
    arch_factor = {a: 1.0 for a in geo["archs"]}
    if set(geo["archs"]) != {"conv4"}:
        arch_factor = api_forward_factors(cfg, geo, device)
    _log("adaptation (inner loop, outer loss, backward)")
    adapt_m = adaptation(cfg, meta, device, reps)
    # the executor the run's --task_exec makes main.py use here, measured against one task at a time
    ex = accel.choose(cfg.task_exec, device)
    seq = ex.kind == "sequential"
    _log(f"replay meta-batch ({cfg.episode_batch} x {cfg.way_train}-way {cfg.num_sup_train}-shot; {ex})")
    replay_m = replay_batch(cfg, meta, device, plan, cfg.num_sup_train, None if seq else ex)
    _log(f"evaluation task ({cfg.way_test}-way {cfg.num_sup_test}-shot; {ex})")
    eval_m = eval_task(cfg, meta, device, plan, cfg.num_sup_test, others=() if seq else (ex,))
    replay_run = replay_m if seq else replay_m["other"]
    eval_run = eval_m if seq else eval_m["others"][str(ex)]
    replay_each = replay_run["seconds"]
    eval_each = eval_m["seconds"] if seq else eval_run["seconds_per_task"]
    mbps = write_speed()

    # one visit, averaged over the API geometries a visit draws
    gi = cfg.generate_iterations
    # another API architecture changes the API's share of a step by its forward time relative to conv4
    factor = sum(arch_factor[a] for a in geo["archs"]) / len(geo["archs"])

    def step(name: str) -> float:
        return sum(w * steps[s][name]["seconds"] * (1 + steps[s][name]["api_share"] * (factor - 1))
                   for s, w in geo["api_sizes"].items())
    sup, qry = step("support_step"), step("query_step")
    plain_qry = sup * cfg.num_qur_kd / cfg.num_sup_kd          # query recovery before advstartit: no student
    n_visits, visit_basis = count_visits(cfg, visits)
    tasks = cfg.episode_train - cfg.start_id + 1
    batches = math.ceil(tasks / cfg.episode_batch)
    boundary_share = min(1.0, max(0.0, (batches - (cfg.advstartit + 1)) / batches))
    v_boundary = round(n_visits * boundary_share)
    setup = sum(w * steps[s]["setup"]["seconds"] for s, w in geo["api_sizes"].items())
    visit_s = gi * (sup + qry) + 2 * setup + adapt_m["seconds"]
    visit_plain_s = gi * (sup + plain_qry) + 2 * setup + adapt_m["seconds"]
    visits_s = v_boundary * visit_s + (n_visits - v_boundary) * visit_plain_s
    replay_s = (tasks - n_visits) / cfg.episode_batch * replay_each
    n_evals = count_evaluations(cfg)
    eval_tasks = n_evals * 2 * geo["eval_datasets"] * cfg.episode_test
    eval_s = eval_tasks * eval_each

    # bytes: the memory, the checkpoints, TensorBoard
    image_bytes = 3 * meta * meta
    per_visit_bytes = cfg.way_pretrain * (cfg.num_sup_kd + cfg.num_qur_kd) * image_bytes
    held = min(cfg.max_batch_per_class, 2 * n_visits * cfg.way_pretrain / geo["classes"])
    memory_bytes = geo["classes"] * held * (cfg.num_sup_kd + cfg.num_qur_kd) / 2 * image_bytes
    memory_bytes = min(memory_bytes, n_visits * per_visit_bytes)
    n_params = _n_params(cfg, meta)
    model_bytes = 4 * n_params
    preview = 0 if cfg.mh else geo["classes"] * 8 * image_bytes
    n_saves = count_saves(cfg)
    ckpt_bytes = n_saves * (3 * model_bytes + preview) + n_visits * per_visit_bytes + n_evals * model_bytes
    ckpt_s = ckpt_bytes / 2 ** 20 / mbps
    tb_bytes = n_visits * 2 * cfg.way_pretrain * 8 * image_bytes + batches * 3 * 60 + n_evals * 8 * 60
    disk = memory_bytes + 3 * model_bytes + preview + model_bytes + tb_bytes + n_evals * 400

    peaks = {"support step": max(st["support_step"]["peak_mem_mb"] for st in steps.values()),
             "query step": max(st["query_step"]["peak_mem_mb"] for st in steps.values()),
             "adaptation": adapt_m["peak_mem_mb"], "replay": replay_run["peak_mem_mb"],
             "evaluation": eval_run["peak_mem_mb"]}
    ram_memory_mb = memory_bytes / 2 ** 20
    api_cache_mb = 8 * _api_mb(geo["archs"], cfg.way_pretrain, max(geo["api_sizes"]))
    if device.type == "cuda":
        peak_gb = max(peaks.values()) / 1024
        host_gb = (ram_memory_mb + api_cache_mb) / 1024
    else:
        peak_gb = (max(peaks.values()) + ram_memory_mb + api_cache_mb) / 1024
        host_gb = peak_gb
    total_s = visits_s + replay_s + eval_s + ckpt_s

    def total_with(v: int) -> float:     # the same measurements under another visit count
        vb = round(v * boundary_share)
        return (vb * visit_s + (v - vb) * visit_plain_s + (tasks - v) / cfg.episode_batch * replay_each
                + eval_s + ckpt_s)
    alternatives = {}
    for name in ("bound", "demo"):
        v = count_visits(cfg, name)[0]
        alternatives[name] = {"api_visits": v, "wall_hours": round(total_with(v) / 3600, 4)}

    archs = (f"; API architectures {'/'.join(geo['archs'])} by their measured forward time relative to conv4 "
             f"(x{factor:.2f} on the API's share of a step)") if factor != 1.0 else ""
    stages = [
        {"stage": "API visits", "count": n_visits, "unit": "visits", "each_s": visit_s, "hours": visits_s / 3600,
         "basis": f"extrapolated: {gi} x (measured support step {sup:.3f} s + measured boundary query step "
                  f"{qry:.3f} s) + 2 x measured set-up {setup:.3f} s + measured adaptation {adapt_m['seconds']:.3f} s; "
                  f"{n_visits - v_boundary} visit(s) before advstartit recover the query set without the student "
                  f"(support step scaled by images: {plain_qry:.3f} s){archs}"},
        {"stage": "replay", "count": tasks - n_visits, "unit": "tasks",
         "each_s": replay_each / cfg.episode_batch, "hours": replay_s / 3600,
         "basis": f"measured meta-batch of {cfg.episode_batch} tasks ({replay_each:.3f} s"
                  f"{'' if seq else f', executor {ex}'}) x meta-batches of replay tasks"},
        {"stage": "evaluation", "count": eval_tasks, "unit": "tasks", "each_s": eval_each,
         "hours": eval_s / 3600,
         "basis": f"measured task{'' if seq else f' (executor {ex})'} x "
                  f"{n_evals} evaluations x {2 * geo['eval_datasets']} splits x {cfg.episode_test} tasks"},
        {"stage": "checkpoints", "count": n_saves, "unit": "saves", "each_s": ckpt_s / max(1, n_saves),
         "hours": ckpt_s / 3600, "basis": f"{ckpt_bytes / 2 ** 30:.3f} GB written (model, Adam state, new memory "
                                          f"files, best.pth) at the measured {mbps:.0f} MB/s"},
    ]
    return {
        "flags": flags, "device": str(device), "environment": environment(device),
        "loadavg": {"start": load0, "end": loadavg()}, "measure_seconds": round(time.perf_counter() - t0, 1),
        "measured": {"recovery_steps": {str(k): v for k, v in steps.items()}, "api_forward_factor": arch_factor,
                     "adaptation": adapt_m, "executor": str(ex),
                     "replay_batch": {**_pick(replay_m), "other": _pick(replay_m["other"])},
                     "eval_task": {**_pick(eval_m),
                                   "others": {c: _pick(v) for c, v in eval_m["others"].items()}},
                     "write_mb_per_s": round(mbps, 1)},
        "assumptions": {"api_visits": visit_basis, "boundary_visits": v_boundary, "alternatives": alternatives,
                        "memory": f"{geo['classes']} classes x {held:.1f} sets held on average"},
        "stages": stages,
        "wall_hours": round(total_s / 3600, 4), "peak_mem_gb": round(peak_gb, 2), "host_mem_gb": round(host_gb, 2),
        "peak_by_part_mb": peaks, "task_memory_gb": round(ram_memory_mb / 1024, 3),
        "disk_gb": round(disk / 2 ** 30, 3), "api_visits": n_visits, "api_queries": n_visits * visit_cost(cfg),
        "tasks": tasks,
    }


def _pick(m: dict) -> dict:
    return {k: m[k] for k in ("executor", "seconds", "seq_seconds_per_task", "seconds_per_task", "reps", "peak_mem_mb")
            if k in m}


def _n_params(cfg, meta: int) -> int:
    from network import build
    m = build(cfg.backbone, cfg.way_train, channels=3, image_size=meta, batch_stats=True,
              pool="max" if cfg.mh else "flatten")
    return sum(p.numel() for p in m.parameters())


def _api_mb(archs, way: int, size: int) -> float:
    from network import build
    return max(sum(p.numel() for p in build(a, way, image_size=size).parameters()) * 4 / 2 ** 20 for a in archs)


def api_forward_factors(cfg, geo: dict, device, n: int = 256) -> dict:
    """Forward time of each API architecture relative to conv4 on n images (the largest API size); the
    API forward's share of a measured conv4 recovery step is scaled by it."""
    from bench.zo_step import random_api
    size = max(geo["api_sizes"])
    x = torch.rand(n, 3, size, size, device=device)
    t = {}
    for a in sorted(set(geo["archs"]) | {"conv4"}):
        _log(f"API forward, {a}, {n} images {size}x{size}")
        api = random_api(a, cfg.way_pretrain, size, device, 0)
        api(x[:8])
        sync(device)
        s = time.perf_counter()
        api(x)
        sync(device)
        t[a] = time.perf_counter() - s
    return {a: round(t[a] / t["conv4"], 3) for a in geo["archs"]}


def render(doc: dict) -> str:
    env = doc["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} thread(s)"
    load = doc["loadavg"]["start"]
    lines = [f"estimate for main.py {' '.join(doc['flags']) or '(defaults)'}",
             f"device {doc['device']} ({where}); load average {load[0] if load else '-'} at the start; measuring "
             f"took {doc['measure_seconds']:.0f} s", "",
             "measured (random weights, synthetic images):"]
    for size, st in doc["measured"]["recovery_steps"].items():
        for name in ("support_step", "query_step"):
            m = st[name]
            lines.append(f"  {name.replace('_', ' ')} at {size}x{size}: {m['seconds']:.3f} s "
                         f"({m['api_share']:.0%} in the API forward), peak {m['peak_mem_mb'] / 1024:.2f} GB")
    for name in ("adaptation", "replay_batch", "eval_task"):
        m = doc["measured"][name]
        lines.append(f"  {name.replace('_', ' ')}: {m['seconds']:.3f} s, peak {m['peak_mem_mb'] / 1024:.2f} GB")
    lines.append(f"  checkpoint write speed: {doc['measured']['write_mb_per_s']:.0f} MB/s")
    alt = "; ".join(f"{k}: {a['api_visits']} visits, {a['wall_hours']:.3f} h"
                    for k, a in doc["assumptions"]["alternatives"].items())
    lines += ["", f"API visits: {doc['api_visits']} ({doc['assumptions']['api_visits']})",
              f"  the total under the other assumptions (same measurements): {alt}", "",
              "projection (extrapolated from the measurements above):"]
    for s in doc["stages"]:
        lines.append(f"  {s['stage']:<12} {s['count']:>9} {s['unit']:<7} {s['each_s']:>10.2f} s each "
                     f"{s['hours']:>10.3f} h   {s['basis']}")
    lines += [f"  {'total':<12} {'':>9} {'':<7} {'':>17} {doc['wall_hours']:>10.3f} h",
              f"peak memory {doc['peak_mem_gb']:.2f} GB (largest measured part + the task memory "
              f"{doc['task_memory_gb']:.2f} GB + 8 open APIs)"
              + (f"; host {doc['host_mem_gb']:.2f} GB" if doc["device"].startswith("cuda") else ""),
              f"disk {doc['disk_gb']:.3f} GB (task memory, last.pth, best.pth, TensorBoard)",
              json.dumps(headline(doc))]
    return "\n".join(lines)


def headline(doc: dict) -> dict:
    """The last line's JSON: the projection's figures without the measurements."""
    out = {k: doc[k] for k in ("wall_hours", "peak_mem_gb", "disk_gb", "api_visits", "api_queries", "tasks",
                               "host_mem_gb", "task_memory_gb")}
    out["hours_by_stage"] = {s["stage"]: round(s["hours"], 4) for s in doc["stages"]}
    out["visits_assumption"] = doc["assumptions"]["api_visits"].split(":")[0]
    out["wall_hours_if"] = {k: a["wall_hours"] for k, a in doc["assumptions"]["alternatives"].items()}
    return out
