"""The meta-training loop of BiDf-MKD, its evaluation and its baselines (docs/method.md).

    for each meta-batch of episode_batch tasks:
        each task is an API visit (bi-level KD, methods/kd.py) when the trigger asks for one,
        else a replay task drawn from the task memory (methods/replay.py);
        θ <- Adam step on the summed outer losses
        trigger: a meta-batch whose training accuracy beats the best since the last visit resets
                 a counter, any other increments it; at generate_interval the next task visits an API
    every val_interval tasks: evaluate on meta_val and meta_test (fixed tasks); keep the best on meta_val
    every save_interval tasks: checkpoint (resumable)
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from core import run_dir
from core.config import Config, check, default_out_dir, settings, visit_cost
from core.device import pick_device
from core.errors import CheckpointError, FlagError, Interrupted, QueryBudgetExceeded
from core.io import atomic_json, atomic_torch_save, load_checkpoint, read_json
from dataset import MIX_DATASETS, MIX_IMAGE_SIZE, Task, check_episode, fixed_tasks, get_spec, load_split, normalize, resize
from dataset.specs import IMAGENET_MEAN, IMAGENET_STD
from network import build
from .maml import evaluate, meta_params
from .replay import augmented, replay_task, replay_tasks


# ---------------------------------------------------------------- geometry, device, data

@dataclass(frozen=True)
class MetaInput:
    """What the meta model sees: images resized to `size`, normalised with mean/std, channels-last
    (the meta model is kept channels-last too: faster test-time adaptation on the CPU, bench/RESULTS.md)."""
    size: int
    channels: int
    mean: tuple
    std: tuple

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        x = normalize(resize(x01, self.size), self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last)


def meta_input(cfg: Config) -> MetaInput:
    """SS/SH: the dataset's own geometry and statistics. MH: 84x84 with ImageNet statistics for
    every source (one normalisation, since replayed tasks mix classes of the three datasets)."""
    if cfg.mh:
        return MetaInput(MIX_IMAGE_SIZE, 3, IMAGENET_MEAN, IMAGENET_STD)
    s = get_spec(cfg.dataset)
    return MetaInput(s.image_size, s.channels, tuple(s.mean), tuple(s.std))


def eval_datasets(cfg: Config) -> list[str]:
    return list(MIX_DATASETS) if cfg.mh else [cfg.dataset]


@dataclass
class EvalSplit:
    dataset: str
    split: str          # meta_val | meta_test
    data: object        # dataset.SplitData


def load_eval_splits(cfg: Config) -> list[EvalSplit]:
    """meta_val and meta_test of each evaluated dataset, checked against the test-task flags."""
    out = []
    for name in eval_datasets(cfg):
        for split in ("meta_val", "meta_test"):
            data = load_split(cfg.data_root, get_spec(name), split)
            check_episode(data, cfg.way_test, cfg.num_sup_test, cfg.num_qur_test, "test")
            out.append(EvalSplit(name, split, data))
    return out


class RealTasks:
    """Tasks from the real meta-train images (baseline maml_real, the upper bound). In MH the
    three datasets share one label space, as the recovered classes do in the memory."""

    def __init__(self, cfg: Config, size: int):
        self.splits = [load_split(cfg.data_root, get_spec(n), "meta_train") for n in eval_datasets(cfg)]
        for d in self.splits:
            check_episode(d, min(cfg.way_train, d.num_classes), cfg.num_sup_train, cfg.num_qur_train, "train")
        self.owner = np.concatenate([np.full(d.num_classes, i) for i, d in enumerate(self.splits)])
        self.local = np.concatenate([np.arange(d.num_classes) for d in self.splits])
        self.size = size

    def can_sample(self, way: int, shot: int, query: int) -> bool:
        return way <= len(self.owner)

    def sample_task(self, way: int, shot: int, query: int, rng: np.random.Generator) -> Task:
        classes = rng.choice(len(self.owner), size=way, replace=False)
        sup, qur = [], []
        for c in classes:
            d = self.splits[self.owner[c]]
            idx = rng.choice(d.indices_of(int(self.local[c])), size=shot + query, replace=False)
            x = resize(d.images(idx), self.size)
            sup.append(x[:shot]); qur.append(x[shot:])
        rel = torch.arange(way)
        return Task(torch.cat(sup), rel.repeat_interleave(shot), torch.cat(qur), rel.repeat_interleave(query),
                    classes)


# ---------------------------------------------------------------- evaluation

def evaluate_all(model: nn.Module, cfg: Config, splits: list[EvalSplit], prep: MetaInput,
                 device) -> dict[tuple[str, str], tuple[float, float]]:
    """{(split, dataset): (acc %, 95% CI)} on the fixed tasks; in MH also (split, 'mean')."""
    params = meta_params(model)
    res = {}
    for s in splits:
        tasks = fixed_tasks(s.data, cfg.way_test, cfg.num_sup_test, cfg.num_qur_test, cfg.episode_test,
                            cfg.eval_seed)
        res[(s.split, s.dataset)] = evaluate(model, params, tasks, cfg.test_inner_update_num, cfg.inner_lr,
                                             prep, cfg.way_test, device, chunk=cfg.eval_chunk)
    if cfg.mh:
        for split in dict.fromkeys(s.split for s in splits):
            accs = [res[(split, d)] for d in MIX_DATASETS]
            res[(split, "mean")] = (float(np.mean([a for a, _ in accs])),
                                    float(math.sqrt(sum(c * c for _, c in accs)) / len(accs)))
    return res


def headline(cfg: Config, res: dict, split: str) -> tuple[float, float]:
    """The figure that stands for a split: its dataset's, or the mean over the three in MH."""
    return res[(split, "mean" if cfg.mh else cfg.dataset)]


# ---------------------------------------------------------------- loop state

@dataclass
class LoopState:
    """Everything besides tensors that a resumed run needs to continue exactly."""
    task: int = 0                   # id of the last finished task
    visit_next: bool = True         # the first task is an API visit
    e_count: int = 0                # meta-batches since the best training accuracy (trigger)
    best_batch_acc: float | None = None
    api_visits: int = 0
    api_queries: int = 0            # queries spent (as of the checkpoint)
    recovery_steps: int = 0         # generator steps of all visits
    budget_note: bool = False
    wall_seconds: float = 0.0
    evals: int = 0
    best_val: float = -1.0          # model selection on meta_val
    best_val_ci: float = 0.0
    best_val_task: int = 0
    best_val_test: float = -1.0     # meta_test accuracy of that model
    best_val_test_ci: float = 0.0
    best_val_res: dict = field(default_factory=dict)
    best_test: float = -1.0         # the original protocol: best meta_test accuracy seen
    best_test_ci: float = 0.0
    best_test_task: int = 0
    last_res: dict = field(default_factory=dict)
    train_acc: float = 0.0          # last meta-batch's training accuracy


def _crossed(prev: int, now: int, every: int) -> bool:
    """Did the task counter pass a multiple of `every` in (prev, now]?"""
    return now // every > prev // every


class Trainer:
    """Owns the run: model, optimiser, task source, outputs. `run()` is the whole loop."""

    def __init__(self, cfg: Config):
        check(cfg)
        self.cfg = cfg
        self.out_dir = default_out_dir(cfg)
        self.device = pick_device(cfg.gpu, say=lambda m: print(f"note: {m}"))
        self.prep = meta_input(cfg)
        self.splits = load_eval_splits(cfg)
        # Everything that can fail on the user's data or pool fails before the run directory is touched.
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.model = build(cfg.backbone, cfg.way_train, channels=self.prep.channels, image_size=self.prep.size,
                           batch_stats=True, init=cfg.init, pool="max" if cfg.mh else "flatten"
                           ).to(self.device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.outer_lr)
        self.pool = self.memory = self.real = None
        if cfg.evaluate:
            if cfg.evaluate != "random":        # 'random': the untrained meta model of --seed
                self._load_meta_model(cfg.evaluate)
            self.splits = [s for s in self.splits if s.split == "meta_test"]
        elif cfg.baseline == "maml_real":
            self.real = RealTasks(cfg, self.prep.size)
        elif cfg.baseline == "none":
            self._open_pool()
        resume_from = run_dir.prepare(cfg, self.out_dir)
        self.finished = resume_from == "finished"
        if self.finished:
            return
        if cfg.resume and resume_from is None:
            print(f"note: nothing to resume in {self.out_dir}; starting a new run")
        self.state = LoopState(task=cfg.start_id - 1)
        if resume_from:
            self._load(resume_from)
        self.metrics = run_dir.MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"),
                                          keep_until_task=self.state.task if resume_from else None)
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"), purge_step=self.state.task + 1 if resume_from else None)
        self.t0 = time.time()
        self.wall0 = self.state.wall_seconds
        self.saved_task = self.state.task if resume_from else None

    def _load_meta_model(self, path: str) -> None:
        """Weights of a saved meta model (best.pth or last.pth of a run with the same geometry)."""
        ck = load_checkpoint(path, what="meta-model checkpoint", hint="pass a run's best.pth or last.pth")
        try:
            self.model.load_state_dict(ck["model"])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"--evaluate {path} is not a meta-model checkpoint of this geometry "
                                  f"(--backbone/--way_train/--dataset): {str(e).splitlines()[0]}") from None

    # -- the API pool and the memory
    def _open_pool(self) -> None:
        from synthesis.memory import TaskMemory, check_replay_flags
        from synthesis.pool import APIPool
        from synthesis.recover import ZOConfig
        from .kd import KDSettings
        cfg = self.cfg
        arch = cfg.pre_backbone
        problem = check_replay_flags(cfg.num_sup_kd, cfg.num_qur_kd, cfg.num_sup_train, cfg.num_qur_train,
                                     cfg.max_batch_per_class)
        if problem:
            raise FlagError(problem)
        # White-box (no --ZO, the ablation): the generator back-propagates through the API.
        self.pool = APIPool.load(cfg.pretrained_path_prefix, cfg.dataset, arch, cfg.way_pretrain, cfg.APInum,
                                 self.device, white_box=not cfg.ZO, budget=cfg.query_budget)
        classes = len(self.pool.classes)
        if cfg.way_train > classes:
            raise FlagError(f"--way_train {cfg.way_train} exceeds the {classes} classes the API pool "
                             f"covers; lower --way_train or pretrain more APIs")
        if cfg.query_budget is not None and cfg.query_budget < visit_cost(cfg):
            raise FlagError(f"--query_budget {cfg.query_budget} does not cover one API visit "
                             f"(~{visit_cost(cfg)} queries with these flags); raise it or lower --generate_iterations/--q")
        self.memory = TaskMemory(cfg.max_batch_per_class, image_size=self.prep.size)
        self.kd = settings(KDSettings, cfg, zo=settings(ZOConfig, cfg) if cfg.ZO else None)
        self.meta_generator = None
        if cfg.meta_generator:
            from synthesis.meta_generator import MetaGenerator
            self.meta_generator = MetaGenerator(lr=cfg.meta_generator_lr)

    def queries(self) -> int:
        return self.pool.queries if self.pool is not None else 0

    # -- checkpoints
    def _memory_dir(self) -> str:
        return os.path.join(self.out_dir, run_dir.MEMORY_DIR)

    def _checkpoint(self) -> dict:
        """The resumable state. The task memory's new batches are written to <out_dir>/memory/ here
        (append-only files); the checkpoint holds their index."""
        self.state.wall_seconds = self.wall0 + time.time() - self.t0
        st = asdict(self.state)
        st["api_queries"] = self.queries()
        ck = {"config": self.cfg.to_dict(), "state": st, "model": self.model.state_dict(),
              "optimizer": self.optimizer.state_dict(), "numpy_rng": self.rng.bit_generator.state,
              "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            ck["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.memory is not None:
            from synthesis.memory import PREVIEW
            # MH: no preview, python -m reporting draws no recovered-vs-real figure there
            ck["memory"] = self.memory.save(self._memory_dir(), preview=0 if self.cfg.mh else PREVIEW)
            ck["pool"] = self.pool.state_dict()
            # Opening an API draws its initial weights from the global RNG: the resumed run must hold the
            # same APIs ready (same LRU order) to draw the same numbers afterwards.
            ck["pool_ready"] = [list(k) for k in self.pool.ready]
            if self.meta_generator is not None:
                ck["meta_generator"] = self.meta_generator.state_dict()
        return ck

    def _load(self, path: str) -> None:
        ck = load_checkpoint(path, what="run checkpoint", hint="it is left untouched: restore it, or pass "
                                                               "--overwrite to start the run over")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        if "cuda_rng" in ck and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        if self.memory is not None:
            # an index refers to <checkpoint's folder>/memory/; a checkpoint of earlier versions holds the images
            self.memory.load_state_dict(ck["memory"], folder=os.path.join(os.path.dirname(path), run_dir.MEMORY_DIR))
            self.pool.load_state_dict(ck["pool"])
            self._reopen(ck.get("pool_ready", []))
            if self.meta_generator is not None and "meta_generator" in ck:
                self.meta_generator.load_state_dict(ck["meta_generator"])
        self.state = LoopState(**ck["state"])
        print(f"resuming {self.out_dir} after task {self.state.task} "
              f"({self.state.api_visits} API visits, {self.state.api_queries} queries so far)")

    def _reopen(self, keys: list) -> None:
        """Open the APIs the checkpointed run held ready, oldest first, without touching the restored RNG."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for dataset, arch, index in keys:
                self.pool.get(dataset, arch, int(index))

    def save_last(self) -> None:
        self.saved_task = self.state.task
        ck = self._checkpoint()
        atomic_torch_save(ck, os.path.join(self.out_dir, "last.pth"))
        if self.memory is not None:     # only now may files the committed index does not name go
            self.memory.prune(self._memory_dir(), ck["memory"])

    def save_best(self) -> None:
        atomic_torch_save({"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                                   "task": self.state.task, "val_acc": self.state.best_val,
                                   "test_acc": self.state.best_val_test},
                                  os.path.join(self.out_dir, "best.pth"))

    # -- one task
    def _visit_allowed(self) -> bool:
        b = self.cfg.query_budget
        if b is None or self.queries() + visit_cost(self.cfg) <= b:
            return True
        if not self.state.budget_note:
            tqdm.write(f"query budget {b} reached ({self.queries()} spent): no more API visits, replay only")
            self.state.budget_note = True
        return False

    def visit_api(self, task_id: int) -> tuple[torch.Tensor, float]:
        """Task `task_id` as an API visit (one bi-level KD task); (outer loss, query accuracy)."""
        from .kd import class_diversity, kd_task
        cfg = self.cfg
        api = self.pool.draw(self.rng)
        gen = torch.Generator(device=self.device).manual_seed(int(self.rng.integers(2 ** 62)))
        boundary = task_id // cfg.episode_batch > cfg.advstartit
        t, q0 = time.time(), self.queries()
        out = kd_task(self.model, meta_params(self.model), api, self.kd, self.prep, boundary=boundary,
                      memory=self.memory, generator=gen, meta_generator=self.meta_generator)
        self.state.api_visits += 1
        self.state.recovery_steps += out.recovery_steps
        self.state.visit_next = False
        tb = self.tb
        tb.add_scalar("kd/kl_query_before_inner", out.kl_before, task_id)
        tb.add_scalar("kd/kl_query_after_inner", out.loss.item(), task_id)
        tb.add_scalar("kd/acc_query", out.acc, task_id)
        tb.add_scalar("kd/api_confidence", out.api_confidence, task_id)
        div = class_diversity(torch.cat([out.support[0], out.query[0]]), torch.cat([out.support[1], out.query[1]]))
        if div:
            tb.add_scalar("kd/class_diversity_mean", float(np.mean(list(div.values()))), task_id)
            tb.add_scalar("kd/class_diversity_min", min(div.values()), task_id)
        tb.add_scalar("kd/seconds_per_visit", time.time() - t, task_id)
        tb.add_scalar("kd/queries_per_visit", self.queries() - q0, task_id)
        tb.add_scalar("kd/recovery_steps_per_visit", out.recovery_steps, task_id)
        tb.add_scalar("api/visits", self.state.api_visits, task_id)
        tb.add_scalar("api/queries", self.queries(), task_id)
        self._log_images(out, len(api.classes), task_id)
        return out.loss, out.acc

    def _log_images(self, out, way: int, task_id: int) -> None:
        """Recovered support and query images, one row per class (at most 8 per class)."""
        from torchvision.utils import make_grid
        for name, (x, _) in (("support", out.support), ("query", out.query)):
            per = x.shape[0] // way
            k = min(per, 8)
            pick = x.view(way, per, *x.shape[1:])[:, :k].reshape(way * k, *x.shape[1:])
            self.tb.add_image(f"recovered/{name}", make_grid(pick.float().cpu(), nrow=k), task_id)

    def draw_replay(self) -> Task:
        """The next replay task from the memory (or the real images for maml_real), augmented here when
        --replay_augment: its random draws (numpy, then torch) come at its turn in the meta-batch,
        whether it runs at once or with the meta-batch's other replay tasks (--replay_vmap)."""
        cfg = self.cfg
        source = self.real if self.real is not None else self.memory
        task = source.sample_task(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train, self.rng).to(self.device)
        return augmented(task) if cfg.replay_augment else task

    def replay(self) -> tuple[torch.Tensor, float]:
        """One replay task; (outer loss, accuracy)."""
        cfg = self.cfg
        return replay_task(self.model, meta_params(self.model), self.draw_replay(), steps=cfg.inner_update_num,
                           lr=cfg.inner_lr, first_order=cfg.approx, prep=self.prep, way=cfg.way_train)

    def replay_together(self, tasks: list[Task]) -> tuple[torch.Tensor, list[float]]:
        """Drawn replay tasks as one vmapped computation; ([T] outer losses, accuracies)."""
        cfg = self.cfg
        return replay_tasks(self.model, meta_params(self.model), tasks, steps=cfg.inner_update_num,
                            lr=cfg.inner_lr, first_order=cfg.approx, prep=self.prep, way=cfg.way_train)

    def _one_task(self, task_id: int, defer_replay: bool = False) -> tuple[torch.Tensor, float] | Task:
        """(outer loss, accuracy) of the task; defer_replay: a replay task is only drawn (returned)."""
        cfg = self.cfg
        replay = self.draw_replay if defer_replay else self.replay
        if self.real is not None:
            return replay()
        can_replay = self.memory.can_sample(cfg.way_train, cfg.num_sup_train, cfg.num_qur_train)
        if (self.state.visit_next or not can_replay) and self._visit_allowed():
            return self.visit_api(task_id)
        if not can_replay:
            raise QueryBudgetExceeded(f"the query budget is spent and the task memory cannot yet supply "
                             f"{cfg.way_train}-way tasks of {cfg.num_sup_train}+{cfg.num_qur_train} images per "
                             "class; raise --query_budget or lower --way_train/--num_sup_train/--num_qur_train")
        return replay()

    # -- the trigger
    def _trigger(self, acc: float) -> None:
        s = self.state
        if s.best_batch_acc is None or acc > s.best_batch_acc:
            s.best_batch_acc, s.e_count = acc, 0
        else:
            s.e_count += 1
            if s.e_count >= self.cfg.generate_interval:
                s.visit_next, s.e_count, s.best_batch_acc = True, 0, None

    # -- evaluation
    def _evaluate(self) -> None:
        cfg, s = self.cfg, self.state
        t = time.time()
        res = evaluate_all(self.model, cfg, self.splits, self.prep, self.device)
        s.evals += 1
        wall = self.wall0 + time.time() - self.t0
        for (split, ds), (acc, ci) in res.items():
            self.metrics.write({"task": s.task, "meta_iter": s.task // cfg.episode_batch, "split": split,
                                "dataset": ds, "acc": round(acc, 4), "ci": round(ci, 4),
                                "api_queries": self.queries(), "api_visits": s.api_visits,
                                "queries_per_visit": round(self.queries() / max(s.api_visits, 1)),
                                "recovery_steps_per_visit": round(s.recovery_steps / max(s.api_visits, 1), 2),
                                "wall_seconds": round(wall, 2)})
            tag = split if ds in ("mean", cfg.dataset) else f"{split}/{ds}"
            self.tb.add_scalar(f"eval/{tag}", acc, s.task)
        val, val_ci = headline(cfg, res, "meta_val")
        test, test_ci = headline(cfg, res, "meta_test")
        s.last_res = {f"{k[0]}/{k[1]}": v for k, v in res.items()}
        if val > s.best_val:
            s.best_val, s.best_val_ci, s.best_val_task = val, val_ci, s.task
            s.best_val_test, s.best_val_test_ci = test, test_ci
            s.best_val_res = dict(s.last_res)
            self.save_best()
        if test > s.best_test:
            s.best_test, s.best_test_ci, s.best_test_task = test, test_ci, s.task
        self.tb.add_scalar("eval/test_acc_best_on_val", s.best_val_test, s.task)
        self.tb.add_scalar("eval/test_acc_best_on_test (original protocol)", s.best_test, s.task)
        self.tb.add_scalar("eval/seconds", time.time() - t, s.task)
        tqdm.write(f"[task {s.task} | meta-iter {s.task // cfg.episode_batch}] meta_val {val:.2f} ± {val_ci:.2f}"
                   f"  meta_test {test:.2f} ± {test_ci:.2f}  | best on val: test {s.best_val_test:.2f} "
                   f"(task {s.best_val_task})  best on test (original protocol): {s.best_test:.2f}"
                   f"  | visits {s.api_visits} queries {self.queries()}  {wall:.0f}s")

    def summary(self) -> dict:
        s, cfg = self.state, self.cfg
        out = {"test_acc": s.best_val_test, "test_ci": s.best_val_test_ci, "val_acc": s.best_val,
               "val_ci": s.best_val_ci, "best_task": s.best_val_task,
               "last_test_acc": headline(cfg, _unflat(s.last_res), "meta_test")[0] if s.last_res else None,
               "test_acc_best_on_test (original protocol)": s.best_test,
               "test_ci_best_on_test (original protocol)": s.best_test_ci,
               "best_on_test_task (original protocol)": s.best_test_task,
               "api_queries": self.queries(), "api_visits": s.api_visits, "tasks": s.task,
               "tasks_run": s.task - cfg.start_id + 1 if cfg.baseline != "random_init" else 0,
               "wall_seconds": round(self.wall0 + time.time() - self.t0, 2),
               "device": str(self.device), "baseline": cfg.baseline}
        if cfg.mh:
            out["per_dataset_best_on_val"] = {k: {"acc": v[0], "ci": v[1]} for k, v in s.best_val_res.items()}
        return out

    # -- the loop
    def run(self) -> dict:
        cfg = self.cfg
        if self.finished:
            summary = read_json(os.path.join(self.out_dir, "summary.json"))
            print(f"{self.out_dir} is already finished: test {summary['test_acc']:.2f} ± {summary['test_ci']:.2f}")
            return summary
        if cfg.evaluate:
            return self._evaluate_only()
        if cfg.baseline == "random_init":
            self._evaluate()
            self.save_last()
            return self._finish()
        try:
            self._loop()
        except KeyboardInterrupt:
            kept = (f"the checkpoint of task {self.saved_task} in {self.out_dir} is kept: add --resume to continue "
                    "from it") if self.saved_task is not None else "no checkpoint was written yet"
            raise Interrupted(f"interrupted during task {self.state.task + 1}; {kept}") from None
        return self._finish()

    def _loop(self) -> None:
        cfg, s = self.cfg, self.state
        bar = tqdm(total=cfg.episode_train, initial=s.task, unit="task", dynamic_ncols=True, mininterval=1.0)
        while s.task < cfg.episode_train:
            prev = s.task
            n = min(cfg.episode_batch - s.task % cfg.episode_batch, cfg.episode_train - s.task)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            accs, losses, drawn, t_batch = [0.0] * n, [0.0] * n, {}, time.time()
            for i in range(n):
                out = self._one_task(s.task + 1, defer_replay=cfg.replay_vmap)
                if isinstance(out, Task):   # --replay_vmap: run with the meta-batch's other replay tasks
                    drawn[i] = out
                else:
                    loss, accs[i] = out
                    loss.backward()         # grad of the summed outer loss, one task's graph at a time
                    losses[i] = loss.item()
                s.task += 1
            if drawn:
                loss, acc = self.replay_together(list(drawn.values()))
                loss.sum().backward()
                for i, l, a in zip(drawn, loss.tolist(), acc):
                    losses[i], accs[i] = l, a
            loss_sum = sum(losses)          # in task order, as the tasks ran
            self.optimizer.step()
            s.train_acc = float(np.mean(accs))
            self._trigger(s.train_acc)
            self.tb.add_scalar("train/outer_loss", loss_sum, s.task)
            self.tb.add_scalar("train/acc", s.train_acc, s.task)
            self.tb.add_scalar("train/seconds_per_meta_batch", time.time() - t_batch, s.task)
            done = s.task >= cfg.episode_train
            if _crossed(prev, s.task, cfg.val_interval) or done:
                self._evaluate()
            if _crossed(prev, s.task, cfg.save_interval) or done:
                self.save_last()
            bar.update(s.task - prev)
            live = {"acc": f"{s.train_acc:.1f}"}
            if s.evals:
                live.update(val=f"{s.best_val:.1f}", test=f"{s.best_val_test:.1f}")
            if self.pool is not None:
                live.update(visits=s.api_visits, queries=self.queries())
            bar.set_postfix(live, refresh=False)
        bar.close()

    def _evaluate_only(self) -> dict:
        """--evaluate: meta_test accuracy of a saved model (selection already happened on meta_val)."""
        cfg = self.cfg
        t = time.time()
        res = evaluate_all(self.model, cfg, self.splits, self.prep, self.device)
        test, test_ci = res[("meta_test", "mean")] if cfg.mh else res[("meta_test", cfg.dataset)]
        for (split, ds), (acc, ci) in res.items():
            self.metrics.write({"task": 0, "meta_iter": 0, "split": split, "dataset": ds, "acc": round(acc, 4),
                                "ci": round(ci, 4), "api_queries": 0, "api_visits": 0,
                                "wall_seconds": round(time.time() - t, 2)})
        summary = {"test_acc": test, "test_ci": test_ci, "checkpoint": cfg.evaluate,
                   "way_test": cfg.way_test, "num_sup_test": cfg.num_sup_test, "episode_test": cfg.episode_test,
                   "wall_seconds": round(time.time() - t, 2), "device": str(self.device)}
        if cfg.mh:
            summary["per_dataset"] = {ds: {"acc": a, "ci": c} for (_, ds), (a, c) in res.items()}
        atomic_json(summary, os.path.join(self.out_dir, "summary.json"))
        print(f"done: {cfg.way_test}-way {cfg.num_sup_test}-shot meta_test {test:.2f} ± {test_ci:.2f} "
              f"({cfg.episode_test} tasks) of {cfg.evaluate} -> {self.out_dir}")
        return summary

    def _finish(self) -> dict:
        summary = self.summary()
        atomic_json(summary, os.path.join(self.out_dir, "summary.json"))
        self.tb.close()
        print(f"done: meta_test {summary['test_acc']:.2f} ± {summary['test_ci']:.2f} (model chosen on meta_val "
              f"{summary['val_acc']:.2f}); best on test (original protocol) "
              f"{summary['test_acc_best_on_test (original protocol)']:.2f}; {summary['api_visits']} API visits, "
              f"{summary['api_queries']} queries, {summary['wall_seconds']:.0f}s -> {self.out_dir}")
        return summary


def _unflat(d: dict) -> dict:
    return {tuple(k.split("/", 1)): tuple(v) for k, v in d.items()}


def train(cfg: Config) -> dict:
    """Run (or resume) one meta-training run; returns the summary."""
    return Trainer(cfg).run()
