"""The meta-training loop of BiDf-MKD (docs/method.md), read top to bottom.

    for each meta-batch of episode_batch tasks:
        plan     which tasks visit an API (the first task, then whenever the trigger asks; also while the
                 memory cannot yet supply a replay task), and which API: the first draw of the task's rng
        visit    each planned task is one bi-level KD task (methods/kd.py); its recovered sets join the
                 task memory, in task order (--api_trust: unless the judge of methods/trust.py drops it)
        replay   every other task is a MAML task drawn from the memory (methods/replay.py), run by the
                 executor (accel: one at a time, lanes or vmap); with --kd_replay, some rerun a recorded
                 visit's KD task instead (methods/kd_replay.py)
        step     θ <- Adam step on the summed outer losses
        trigger  a meta-batch whose training accuracy beats the best since the last visit resets a
                 counter, any other increments it; at generate_interval the next task visits an API
    every val_interval tasks: evaluate on meta_val and meta_test (fixed tasks); keep the best on meta_val
    every save_interval tasks: checkpoint (resumable)

Under torchrun (docs/distributed.md) task i of a meta-batch runs on rank i % N and the meta-gradient is
all-reduced; every draw of a task comes from (seed, task id), so the process count changes the speed,
not the results.
"""
from __future__ import annotations

import os
import time
import numpy as np
import torch
from tqdm import tqdm

import accel
from core import dist, run_dir
from core.config import Config, default_out_dir, visit_cost
from core.device import pick_device
from core.errors import FlagError, Interrupted, PoolError, QueryBudgetExceeded
from core.io import read_json
from core.seeding import forked_rng, seed_torch, task_rng

from . import checkpoint
from .baselines import RealTasks
from .diagnostics import log_visit
from .evaluate import evaluate, evaluate_only, finish, load_eval_splits
from .kd import KD_LOSSES, kd_task
from . import kd_replay
from .maml import meta_params, percent, task_loss
from .meta_gradient import TaskGrads
from .meta_model import build_meta_model, meta_input
from .replay import draw_replay
from .trust import make_judge
from .run_state import LoopState, Run


def train(cfg: Config) -> dict:
    """Run (or resume) one meta-training run, or an evaluation (--evaluate); returns the summary.
    The settings are checked already (methods/checks.py, by the entry point)."""
    procs = dist.Dist.from_env()
    device = pick_device(cfg.gpu, local_rank=procs.local_rank, world=procs.local_world, deterministic=cfg.deterministic,
                         say=(lambda m: print(f"note: {m}")) if procs.is_main else None)
    ex = accel.choose(cfg.task_exec, device, procs.world)
    dist.init(procs, device)
    prep = meta_input(cfg)
    model = build_meta_model(cfg, prep, device)
    run = Run(cfg, procs, device, ex, prep, load_eval_splits(cfg, ("meta_test",) if cfg.evaluate else None), model,
              torch.optim.Adam(model.parameters(), lr=cfg.outer_lr), default_out_dir(cfg))
    # Everything that can fail on the user's data or pool fails before the run directory is touched.
    if cfg.evaluate:
        if cfg.evaluate != "random":                    # 'random': the untrained meta model of --seed
            checkpoint.load_meta_model(model, cfg.evaluate)
    elif cfg.baseline == "maml_real":
        run.real = RealTasks(cfg, prep.size)
    elif cfg.baseline == "none":
        open_pool(run)
    resume_from = dist.on_main(lambda: run_dir.prepare(cfg, run.out_dir), procs)
    if resume_from == "finished":
        summary = dist.on_main(lambda: read_json(os.path.join(run.out_dir, "summary.json")), procs)
        if procs.is_main:
            print(f"{run.out_dir} is already finished: test {summary['test_acc']:.2f} ± {summary['test_ci']:.2f}")
        dist.close(procs)
        return summary
    if cfg.resume and resume_from is None and procs.is_main:
        print(f"note: nothing to resume in {run.out_dir}; starting a new run")
    run.state = LoopState(task=cfg.start_id - 1)
    if resume_from:
        checkpoint.resume(run, resume_from)
        if procs.is_main:
            print(f"resuming {run.out_dir} after task {run.state.task} "
                  f"({run.state.api_visits} API visits, {run.state.api_queries} queries so far)")
    if procs.is_main:
        from torch.utils.tensorboard import SummaryWriter
        run.metrics = run_dir.MetricsLog(os.path.join(run.out_dir, "metrics.jsonl"),
                                         keep_until_task=run.state.task if resume_from else None)
        run.tb = SummaryWriter(os.path.join(run.out_dir, "tb"), purge_step=run.state.task + 1 if resume_from else None)
    run.clock = (time.time(), run.state.wall_seconds)
    if cfg.evaluate:
        summary = evaluate_only(run)
        dist.close(procs)
        return summary
    try:
        if cfg.baseline == "random_init":
            evaluate(run)
            checkpoint.save_last(run)
        else:
            loop(run)
    except KeyboardInterrupt:
        raise stopped(run, "interrupted") from None
    except Exception as e:
        if not dist.lost_peer(e):
            raise
        raise stopped(run, "stopped: another process of the run ended") from None
    summary = finish(run)
    dist.close(procs)
    return summary


def open_pool(run: Run) -> None:
    """The API pool the flags name, an empty task memory, and the meta-generator (--meta_generator)."""
    from synthesis.pool import APIPool
    from .memory import TaskMemory
    cfg = run.cfg
    # White-box (no --ZO, the ablation): the generator back-propagates through the API.
    run.pool = APIPool.load(cfg.pretrained_path_prefix, cfg.dataset, cfg.pre_backbone, cfg.way_pretrain, cfg.APInum,
                            run.device, white_box=not cfg.ZO, budget=cfg.query_budget, output=cfg.api_output,
                            say=None if run.procs.is_main else (lambda m: None))
    if cfg.way_train > len(run.pool.classes):
        raise FlagError(f"way_train {cfg.way_train} exceeds the {len(run.pool.classes)} classes the API pool "
                        "covers; lower way_train or pretrain more APIs")
    run.memory = TaskMemory(cfg.max_batch_per_class, image_size=run.prep.size, quantize=cfg.memory_quantize)
    if cfg.meta_generator:
        from synthesis.meta_generator import MetaGenerator
        run.meta_generator = MetaGenerator(lr=cfg.meta_generator_lr)
    if cfg.kd_replay > 0:
        run.visits = kd_replay.VisitMemory(cfg.kd_replay_keep)


def loop(run: Run) -> None:
    cfg, s = run.cfg, run.state
    bar = tqdm(total=cfg.episode_train, initial=s.task, unit="task", dynamic_ncols=True, mininterval=1.0,
               disable=not run.procs.is_main)
    while s.task < cfg.episode_train:
        prev, t = s.task, time.time()
        n = min(cfg.episode_batch - s.task % cfg.episode_batch, cfg.episode_train - s.task)
        run.model.train()
        run.optimizer.zero_grad(set_to_none=True)
        losses, accs = meta_batch(run, list(range(s.task + 1, s.task + n + 1)))
        s.task += n
        run.optimizer.step()
        s.train_acc = float(np.nanmean(accs)) if not np.isnan(accs).all() else float("nan")
        if not np.isnan(s.train_acc) and (s.best_batch_acc is None or s.train_acc > s.best_batch_acc):  # the trigger
            s.best_batch_acc, s.e_count = s.train_acc, 0
        else:
            s.e_count += 1
            if s.e_count >= cfg.generate_interval:
                s.visit_next, s.e_count, s.best_batch_acc = True, 0, None
        for tag, v in (("outer_loss", sum(losses)), ("acc", s.train_acc), ("seconds_per_meta_batch", time.time() - t)):
            run.tb.add_scalar(f"train/{tag}", v, s.task)
        done = s.task >= cfg.episode_train
        if s.task // cfg.val_interval > prev // cfg.val_interval or done:
            evaluate(run)
        if s.task // cfg.save_interval > prev // cfg.save_interval or done:
            checkpoint.save_last(run)
        bar.update(s.task - prev)
        live = {"acc": f"{s.train_acc:.1f}"}
        if s.evals:
            live.update(val=f"{s.best_val:.1f}", test=f"{s.best_val_test:.1f}")
        if run.pool is not None:
            live.update(visits=s.api_visits, queries=run.queries())
        bar.set_postfix(live, refresh=False)
    bar.close()


def meta_batch(run: Run, ids: list[int]) -> tuple[list[float], list[float]]:
    """Tasks `ids` (task i of the batch on rank i % N); leaves Σ_i ∇_θ L_i in the .grad fields of every
    process and returns (outer losses, accuracies) in task order, the same on every process."""
    cfg, procs, device = run.cfg, run.procs, run.device
    plan = plan_meta_batch(run, ids)
    grads = TaskGrads(list(run.model.parameters()), len(ids))
    done, visits = {}, {}
    for i, planned in enumerate(plan):      # 1. the API visits
        if planned is not None and procs.owns(i):
            out, visits[i] = visit(run, ids[i], *planned)
            out.loss.backward()             # one task's graph at a time
            grads.take(i)
            del out
    for i, r in dist.gather_items(visits, procs).items():      # their sets join the memory, on every process
        if r["rank"] != procs.rank:
            run.pool.add_queries(r["queries"])
        if r["verdict"] is not None:
            past = run.state.trust_history.setdefault(r["api"], {"sharpness": [], "agreement": []})
            past["sharpness"].append(r["verdict"]["sharpness"])
            if r["verdict"]["agreement"] is not None:
                past["agreement"].append(r["verdict"]["agreement"])
        if r["support"] is not None:
            run.memory.add(*r["support"], owner=r["api"])
            run.memory.add(*r["query"], owner=r["api"])
            if r["spare"] is not None:
                run.memory.add(*r["spare"], owner=r["api"])
            if run.visits is not None:
                run.visits.add(kd_replay.VisitRecord.of(r["api"], *r["queried"]))
        elif r["api"] not in run.state.distrusted:     # --api_trust dropped the visit
            run.state.distrusted.append(r["api"])
            r["verdict"]["memory_images_dropped"] = run.memory.drop_owner(r["api"])
            if run.visits is not None:
                run.visits.drop_owner(r["api"])
        run.state.api_visits += 1
        run.state.recovery_steps += r["recovery_steps"]
        run.state.visit_next = False
        if procs.is_main:
            log_visit(run.tb, r, ids[i], run.state.api_visits, run.queries())
            if r["verdict"] is not None:
                run.metrics.write({"task": ids[i], "visit": run.state.api_visits, "trust": r["verdict"]})
        done[i] = (r["loss"], r["acc"])
    # 2. replay: a recorded visit's KD task run again (--kd_replay), else a MAML task from the memory (a task
    # the memory cannot supply, after --api_trust dropped a planned visit, is skipped)
    rerun = {i: kd_replay.pick(cfg, ids[i], len(run.visits)) if run.visits is not None else None
             for i, planned in enumerate(plan) if planned is None}
    sampled = run.real is not None or run.memory.can_sample(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train)
    for i, k in rerun.items():
        if k is None and not sampled:
            done[i] = (0.0, float("nan"))
    again = [i for i, k in rerun.items() if k is not None and procs.owns(i)]
    for i in again:                         # one at a time, as the visits
        loss, acc = kd_replay.kd_replay_task(run.model, meta_params(run.model), run.visits.records[rerun[i]], cfg,
                                             run.prep, KD_LOSSES[cfg.kd_loss], device)
        loss.backward()
        grads.take(i)
        done[i] = (loss.item(), acc)
    mine = [i for i, k in rerun.items() if k is None and sampled and procs.owns(i)]
    tasks = [draw_replay(run.real if run.real is not None else run.memory, cfg, ids[i], device) for i in mine]
    kw = dict(steps=cfg.inner_update_num, lr=cfg.inner_lr, way=cfg.way_train, first_order=cfg.approx)
    out = accel.grad_tasks(run.ex, run.model, lambda m, p, *t: task_loss(m, p, *t, **kw), meta_params(run.model),
                           [(run.prep(t.support_x), t.support_y, run.prep(t.query_x), t.query_y) for t in tasks])
    for i, ((loss, acc), g) in zip(mine, out):
        grads.put(i, g)
        done[i] = (loss, percent(acc))
    done.update(dist.gather_items({i: done[i] for i in [*again, *mine]}, procs))
    grads.reduce(procs)
    return [done[i][0] for i in range(len(ids))], [done[i][1] for i in range(len(ids))]


def plan_meta_batch(run: Run, ids: list[int]) -> list:
    """Per task, (the API entry it visits, the task's rng after that draw), or None for a replay task; the
    same on every process. A task visits an API when the trigger asked for one (the first task after it)
    or while the memory cannot yet supply a replay task, within the query budget. A visit adds a support
    and a query batch (and --screen_memory's spares: memory_batches) to each of its API's classes and costs
    visit_cost(cfg) queries, so whether the memory can supply a task is known before any visit runs: a
    meta-batch's visits come first."""
    cfg, s = run.cfg, run.state
    if run.real is not None:
        return [None] * len(ids)
    counts, queries, visit_next = run.memory.counts(), run.queries(), s.visit_next
    out = []
    for task_id in ids:
        can_replay = counts.can_sample(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train)
        wanted = visit_next or not can_replay
        if wanted and cfg.query_budget is not None and queries + visit_cost(cfg) > cfg.query_budget:
            wanted = False
            if not s.budget_note and run.procs.is_main:
                tqdm.write(f"query budget {cfg.query_budget} reached ({queries} spent): no more API visits, replay only")
            s.budget_note = True
        if wanted:
            rng = task_rng(cfg.seed, task_id)
            entry = pick_trusted(run.pool, rng, s.distrusted)
            counts.add(entry.classes, *memory_batches(cfg))
            queries += visit_cost(cfg)
            visit_next = False
            out.append((entry, rng))
        elif not can_replay:
            raise QueryBudgetExceeded(f"the query budget is spent and the task memory cannot yet supply {cfg.way_train}"
                                      f"-way tasks of {cfg.num_sup_train}+{cfg.num_qur_train} images per class; raise "
                                      "query_budget or lower way_train/num_sup_train/num_qur_train")
        else:
            out.append(None)
    return out


def memory_batches(cfg) -> tuple[int, ...]:
    """Images per class of each batch a visit adds to the memory: support, query (and --screen_memory's spares)."""
    spares = (cfg.screen_memory,) if cfg.recovery == "screen" and cfg.screen_memory else ()
    return (cfg.num_sup_kd, cfg.num_qur_kd, *spares)


def pick_trusted(pool, rng, distrusted: list[str]):
    """The API a visit draws: pool.pick, drawn again while it names a distrusted API (--api_trust)."""
    entry = pool.pick(rng)
    for _ in range(1000):
        if entry.name not in distrusted:
            return entry
        entry = pool.pick(rng)
    raise PoolError(f"--api_trust distrusts every API the run can draw ({', '.join(distrusted)}); see the trust "
                    "records in metrics.jsonl, or run without --api_trust")


def visit(run: Run, task_id: int, entry, rng) -> tuple:
    """Task `task_id` as a visit to the planned API (one bi-level KD task); (its outcome, the record every
    process needs of it: recovered sets, queries, diagnostics)."""
    cfg = run.cfg
    before, t = dict(run.pool.meter.per_api), time.time()
    with forked_rng(run.device):
        api = run.pool.open(entry)          # opening draws from the global RNG: before seeding it
        judge = (make_judge(run.pool, run.memory, entry, run.state.distrusted,
                            run.state.trust_history.get(entry.name, {}), cfg, task_id)
                 if cfg.api_trust != "off" else None)
        out = kd_task(run.model, meta_params(run.model), api, cfg, run.prep, generator=seed_torch(rng, run.device),
                      boundary=task_id // cfg.episode_batch > cfg.advstartit, meta_generator=run.meta_generator,
                      judge=judge)
    spent = {k: v - before.get(k, 0) for k, v in run.pool.meter.per_api.items() if v != before.get(k, 0)}
    return out, {"rank": run.procs.rank, "loss": out.loss.item(), "acc": out.acc, "kl_before": out.kl_before,
                 "api_confidence": out.api_confidence, "api_agreement": out.api_agreement,
                 "seconds": time.time() - t, "queries": spent, "recovery_steps": out.recovery_steps,
                 "api": entry.name, "way": len(entry.classes), "verdict": out.verdict,
                 "support": out.support and tuple(v.cpu() for v in out.support),
                 "query": out.query and tuple(v.cpu() for v in out.query),
                 "queried": out.queried and tuple(v.cpu() for v in out.queried),
                 "spare": out.spare and tuple(v.cpu() for v in out.spare)}


def stopped(run: Run, why: str) -> Interrupted:
    kept = (f"the checkpoint of task {run.saved_task} in {run.out_dir} is kept: add --resume to continue from it"
            if run.saved_task is not None else "no checkpoint was written yet")
    return Interrupted(f"{why} during task {run.state.task + 1}; {kept}")
