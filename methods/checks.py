"""The checks of a main.py run's settings that need no data: one clear line naming the flag, before any
work. The entry point calls `check` once; the library trusts a checked Config."""
from __future__ import annotations

import os

import accel
from core.config import Config, check_values, screen_candidates, visit_cost
from core.dist import Dist
from core.errors import FlagError
from dataset.specs import MIX_DATASETS, MIX_NUM_CLASSES, SPECS
from network import ARCHS

from .memory import check_replay_flags


def check(cfg: Config) -> None:
    if cfg.dataset != "mix" and cfg.dataset not in SPECS:
        raise FlagError(f"--dataset {cfg.dataset!r} is unknown; choose one of {', '.join(SPECS)} or mix (API-MH)")
    if cfg.backbone not in ARCHS:
        raise FlagError(f"--backbone {cfg.backbone!r} is unknown; choose one of {', '.join(ARCHS)}")
    if cfg.pre_backbone not in (*ARCHS, "mix"):
        raise FlagError(f"--pre_backbone {cfg.pre_backbone!r} is unknown; choose one of {', '.join(ARCHS)} or mix")
    if cfg.mh and cfg.pre_backbone != "mix":
        raise FlagError(f"--dataset mix (API-MH) draws the architecture of every API too, so --pre_backbone "
                        f"{cfg.pre_backbone} would be ignored; pass --pre_backbone mix")
    check_values(cfg)
    accel.parse_task_exec(cfg.task_exec)
    if cfg.start_id > cfg.episode_train:
        raise FlagError(f"--start_id {cfg.start_id} is past --episode_train {cfg.episode_train}: no task to run")
    if cfg.way_test > cfg.way_train:
        raise FlagError(f"--way_test {cfg.way_test} exceeds --way_train {cfg.way_train}: the meta model's head is "
                        "way_train wide; raise --way_train or lower --way_test")
    if cfg.baseline == "none" and cfg.way_pretrain > cfg.way_train:
        raise FlagError(f"--way_pretrain {cfg.way_pretrain} exceeds --way_train {cfg.way_train}: the meta model's "
                        "head must cover an API's classes; raise --way_train")
    if cfg.evaluate and cfg.evaluate != "random" and not os.path.isfile(cfg.evaluate):
        raise FlagError(f"--evaluate {cfg.evaluate}: no such checkpoint; pass a run's best.pth or last.pth")
    if cfg.resume and cfg.overwrite:
        raise FlagError("--resume and --overwrite contradict each other; pass one")
    classes = MIX_NUM_CLASSES if cfg.mh else SPECS[cfg.dataset].num_classes[0]
    if cfg.way_train > classes:
        raise FlagError(f"--way_train {cfg.way_train} exceeds the {classes} meta-train classes of {cfg.dataset}")
    if cfg.baseline != "none" or cfg.evaluate:
        return
    problem = check_replay_flags(cfg.num_sup_kd, cfg.num_qur_kd, cfg.num_sup_train, cfg.num_qur_train,
                                 cfg.max_batch_per_class)
    if problem:
        raise FlagError(problem)
    sizes = {SPECS[d].image_size for d in (MIX_DATASETS if cfg.mh else (cfg.dataset,))}
    if cfg.ZO and cfg.zo_resolution and any(n % cfg.zo_resolution for n in sizes):
        raise FlagError(f"--zo_resolution {cfg.zo_resolution} must divide the APIs' image size "
                        f"({' and '.join(map(str, sorted(sizes)))}); pick a divisor, or 0 for full resolution")
    if cfg.query_budget is not None and cfg.query_budget < visit_cost(cfg):
        raise FlagError(f"--query_budget {cfg.query_budget} does not cover one API visit (~{visit_cost(cfg)} queries "
                        "with these flags); raise it or lower --generate_iterations/--q")
    # (--screen_candidates and --screen_prior may come from a recipe: inversion ignores them)
    if cfg.recovery != "screen" and cfg.screen_memory:
        raise FlagError("--screen_memory hands the memory more screened images: add --recovery screen, or drop it")
    if cfg.recovery != "screen" and cfg.screen_spread > 1:
        raise FlagError("--screen_spread draws screened images at random: add --recovery screen, or drop it")
    per_image = screen_candidates(cfg)
    if cfg.recovery == "screen" and per_image < cfg.screen_spread:
        raise FlagError(f"--screen_spread {cfg.screen_spread} draws from more candidates than the {per_image} screened "
                        "per image; lower it or raise --screen_candidates")
    if cfg.recovery == "screen" and per_image * cfg.num_sup_kd < cfg.num_sup_kd * cfg.screen_spread + cfg.screen_memory:
        raise FlagError(f"--screen_memory {cfg.screen_memory} asks more of each class than its support set's "
                        f"{per_image * cfg.num_sup_kd} candidates can give beside the "
                        f"{cfg.num_sup_kd * cfg.screen_spread} its images are drawn from; lower it or raise "
                        "--screen_candidates")
    if cfg.recovery == "screen" and cfg.meta_generator:
        raise FlagError("--recovery screen trains no generator, so --meta_generator has nothing to start; drop one")
    if cfg.meta_generator and Dist.from_env().world > 1:
        raise FlagError("--meta_generator learns from the visits one after another, in one process; run it "
                        "without torchrun")
