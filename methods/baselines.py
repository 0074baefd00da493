"""The baselines' task source: MAML on the real meta-train images (maml_real, the upper bound).
(The other baseline, random_init, is the untrained meta model: nothing to draw.)"""
from __future__ import annotations

import numpy as np
import torch

from core.config import Config
from dataset import Task, check_episode, get_spec, load_split, resize

from .evaluate import eval_datasets


class RealTasks:
    """Tasks from the real meta-train images. In MH the three datasets share one label space, as the
    recovered classes do in the memory."""

    def __init__(self, cfg: Config, size: int):
        self.splits = [load_split(cfg.data_root, get_spec(n), "meta_train") for n in eval_datasets(cfg)]
        for d in self.splits:
            check_episode(d, min(cfg.way_train, d.num_classes), cfg.num_sup_train, cfg.num_qur_train, "train")
        self.owner = np.concatenate([np.full(d.num_classes, i) for i, d in enumerate(self.splits)])
        self.local = np.concatenate([np.arange(d.num_classes) for d in self.splits])
        self.size = size

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
