"""The run's configuration: every flag of main.py as plain data, with its checks.

Defaults are the original's (mainKD.py argparse); the scenario scripts in scriptskd/ set the
paper's values on top of them.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

BASELINES = ("none", "random_init", "maml_real")
META_ARCHS = ("conv4", "resnet10", "resnet18")
API_ARCHS = ("conv4", "resnet10", "resnet18", "mix")

# Keys that may change between a run and its --resume without changing its results.
RUNTIME_KEYS = ("multigpu", "evaluate", "gpu", "resume", "overwrite", "out_dir", "data_root", "pretrained_path_prefix")


@dataclass
class Config:
    # basic
    multigpu: str = "0"             # visible CUDA devices (CUDA_VISIBLE_DEVICES)
    gpu: int = 0                    # CUDA device index among the visible ones; CPU when none
    dataset: str = "cifar100"       # cifar100 | miniimagenet | cub (| demo); mix for API-MH
    pretrained_path_prefix: str = "./pretrained_blackbox"
    data_root: str = "./DFL2Ldata"
    out_dir: str | None = None      # default runs/<run_name(cfg)>
    seed: int = 2022                # the original seeded everything with 2022
    eval_seed: int = 0              # seed of the fixed evaluation tasks (same for every run)
    resume: bool = False
    overwrite: bool = False
    # meta-training tasks (memory replay) and evaluation tasks
    way_train: int = 5
    num_sup_train: int = 5
    num_qur_train: int = 15
    way_test: int = 5
    num_sup_test: int = 5
    num_qur_test: int = 15
    backbone: str = "conv4"         # the meta model
    episode_train: int = 240000     # tasks in total (API visits + replay tasks)
    episode_test: int = 600         # evaluation tasks per split
    start_id: int = 1               # id of the first task (tasks start_id..episode_train)
    inner_update_num: int = 5
    test_inner_update_num: int = 10
    inner_lr: float = 0.01
    outer_lr: float = 0.001
    approx: bool = False            # first-order MAML
    episode_batch: int = 4          # tasks per meta-batch (one Adam step)
    val_interval: int = 2000        # tasks between evaluations
    save_interval: int = 2000       # tasks between checkpoints
    # bi-level meta knowledge distillation
    num_sup_kd: int = 30
    num_qur_kd: int = 30
    inner_update_num_kd: int = 10
    adv: float = 1.0                # weight of the boundary term (query set)
    advstartit: int = -1            # boundary query sets after this many meta-iterations
    # the API pool and data recovery
    way_pretrain: int = 5
    APInum: int = 100
    pre_backbone: str = "conv4"     # conv4 | resnet10 | resnet18 (API-SS); mix (API-SH/MH)
    generate_interval: int = 200    # meta-batches without progress before the next API visit
    generate_iterations: int = 200
    Glr: float = 0.001
    max_batch_per_class: int = 20   # task memory: syntheses kept per class
    query_budget: int | None = None  # total API queries allowed (None: unlimited)
    replay_augment: bool = False    # crop/flip replayed images (off, as in the original)
    # zero-order optimisation
    ZO: bool = False
    mu: float = 0.005
    q: int = 100
    numsplit: int = 5
    # baselines
    baseline: str = "none"          # none | random_init | maml_real
    evaluate: str | None = None     # evaluate a saved meta model (a run's best.pth; 'random': untrained) on meta_test

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mh(self) -> bool:
        return self.dataset == "mix"


def from_dict(d: dict) -> Config:
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names})


def run_name(cfg: Config) -> str:
    """runs/<name>: the flags that tell runs apart."""
    shots = f"{cfg.way_train}w{cfg.num_sup_train}s"
    if cfg.evaluate:
        return f"eval_{cfg.dataset}_{cfg.way_test}w{cfg.num_sup_test}s_{'random' if cfg.evaluate == 'random' else os.path.basename(os.path.dirname(os.path.abspath(cfg.evaluate)))}"
    if cfg.baseline != "none":
        return f"{cfg.baseline}_{cfg.dataset}_{cfg.backbone}_{shots}_seed{cfg.seed}"
    grad = f"ZO_q{cfg.q}_mu{cfg.mu}" if cfg.ZO else "whitebox"
    name = f"bidf_{cfg.dataset}_{cfg.pre_backbone}_{cfg.backbone}_{shots}_{grad}_api{cfg.APInum}"
    if cfg.approx:
        name += "_1order"
    return name + f"_seed{cfg.seed}"


def default_out_dir(cfg: Config) -> str:
    return cfg.out_dir or os.path.join("runs", run_name(cfg))


def config_diff(a: dict, b: dict) -> list[str]:
    """Flags (not runtime ones) whose values differ between two configs."""
    keys = (set(a) | set(b)) - set(RUNTIME_KEYS)
    return sorted(k for k in keys if a.get(k) != b.get(k))


def _fail(msg: str):
    raise SystemExit(f"error: {msg}")


def check_flags(cfg: Config) -> None:
    """Flag checks that need no data: one clear line naming the flag, before any work."""
    from dataset import SPECS
    if cfg.dataset != "mix" and cfg.dataset not in SPECS:
        _fail(f"--dataset {cfg.dataset!r} is unknown; choose one of {', '.join(SPECS)} or mix (API-MH)")
    if cfg.backbone not in META_ARCHS:
        _fail(f"--backbone {cfg.backbone!r} is unknown; choose one of {', '.join(META_ARCHS)}")
    if cfg.pre_backbone not in API_ARCHS:
        _fail(f"--pre_backbone {cfg.pre_backbone!r} is unknown; choose one of {', '.join(API_ARCHS)}")
    if cfg.baseline not in BASELINES:
        _fail(f"--baseline {cfg.baseline!r} is unknown; choose one of {', '.join(BASELINES)}")
    at_least = {"way_train": 2, "way_test": 2, "way_pretrain": 2, "num_sup_train": 1, "num_qur_train": 1,
                "num_sup_test": 1, "num_qur_test": 1, "episode_train": 1, "episode_test": 1,
                "episode_batch": 1, "val_interval": 1, "save_interval": 1, "num_sup_kd": 1,
                "num_qur_kd": 1, "generate_interval": 1, "generate_iterations": 1, "APInum": 1,
                "q": 1, "numsplit": 1, "max_batch_per_class": 1, "start_id": 1,
                "inner_update_num": 0, "test_inner_update_num": 0, "inner_update_num_kd": 0}
    for k, lo in at_least.items():
        if getattr(cfg, k) < lo:
            _fail(f"--{k} must be at least {lo}, got {getattr(cfg, k)}")
    for k in ("outer_lr", "Glr", "mu"):
        if not getattr(cfg, k) > 0:
            _fail(f"--{k} must be positive, got {getattr(cfg, k)}")
    for k in ("inner_lr", "adv"):
        if getattr(cfg, k) < 0:
            _fail(f"--{k} must not be negative, got {getattr(cfg, k)}")
    if cfg.start_id > cfg.episode_train:
        _fail(f"--start_id {cfg.start_id} is past --episode_train {cfg.episode_train}: no task to run")
    if cfg.way_test > cfg.way_train:
        _fail(f"--way_test {cfg.way_test} exceeds --way_train {cfg.way_train}: the meta model's head is "
              "way_train wide; raise --way_train or lower --way_test")
    if cfg.baseline == "none" and cfg.way_pretrain > cfg.way_train:
        _fail(f"--way_pretrain {cfg.way_pretrain} exceeds --way_train {cfg.way_train}: the meta model's "
              "head must cover an API's classes; raise --way_train")
    if cfg.query_budget is not None and cfg.query_budget < 1:
        _fail(f"--query_budget must be positive, got {cfg.query_budget}")
    if cfg.evaluate and cfg.evaluate != "random" and not os.path.isfile(cfg.evaluate):
        _fail(f"--evaluate {cfg.evaluate}: no such checkpoint; pass a run's best.pth or last.pth")
    if cfg.resume and cfg.overwrite:
        _fail("--resume and --overwrite contradict each other; pass one")
    classes = 228 if cfg.mh else SPECS[cfg.dataset].num_classes[0]
    if cfg.way_train > classes:
        _fail(f"--way_train {cfg.way_train} exceeds the {classes} meta-train classes of {cfg.dataset}")


def visit_cost(cfg: Config) -> int:
    """API queries of one visit (upper bound): every synthesis step queries each image once,
    plus q perturbed copies with --ZO; then the API labels the kept images once."""
    per_step = (cfg.q + 1) if cfg.ZO else 1
    images = cfg.way_pretrain * (cfg.num_sup_kd + cfg.num_qur_kd)
    return images * (cfg.generate_iterations * per_step + 1)
