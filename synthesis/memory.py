"""Task memory: recovered images per absolute class, replayed as new few-shot tasks.

Each `add` stores, for every class it contains, one batch (one synthesis) in that class's ring
buffer of at most `max_batch_per_class` batches; the oldest batch is dropped first. Tasks are
drawn across *all* stored classes, so classes of different APIs meet in one task. Images are kept
as 8-bit pixels at the meta model's input size (the original wrote PNGs: same quantisation, a
quarter of float32's memory); API-MH images are resized on the way in.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from core.errors import CheckpointError, FlagError
from dataset.augment import resize
from dataset.sampler import Task


class TaskMemory:
    def __init__(self, max_batch_per_class: int = 20, image_size: int = 32):
        if max_batch_per_class < 1:
            raise FlagError(f"--max_batch_per_class must be at least 1, got {max_batch_per_class}")
        self.max_batch_per_class = int(max_batch_per_class)
        self.image_size = int(image_size)
        self._store: dict[int, deque] = {}

    # -- filling
    def add(self, images: torch.Tensor, labels) -> None:
        """images [N, C, H, W] in [0, 1]; labels [N] absolute class ids. One batch per class present."""
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"TaskMemory.add: {images.shape[0]} images but {labels.shape[0]} labels")
        x = resize(images.detach().float(), self.image_size).cpu()
        pixels = x.clamp(0, 1).mul(255).round().to(torch.uint8)
        if self._store:
            c_have = next(iter(self._store.values()))[0].shape[1]
            if pixels.shape[1] != c_have:
                raise ValueError(f"TaskMemory.add: {pixels.shape[1]}-channel images, memory holds {c_have}-channel")
        for c in labels.unique().tolist():
            buf = self._store.setdefault(int(c), deque(maxlen=self.max_batch_per_class))
            buf.append(pixels[labels == c].contiguous())

    # -- what is in it
    @property
    def classes(self) -> list[int]:
        return sorted(self._store)

    def count(self, c: int) -> int:
        """Images held for absolute class c."""
        return sum(b.shape[0] for b in self._store.get(int(c), ()))

    def __len__(self) -> int:
        return sum(self.count(c) for c in self._store)

    def eligible(self, per_class: int) -> list[int]:
        """Classes holding at least `per_class` images."""
        return [c for c in self.classes if self.count(c) >= per_class]

    def can_sample(self, way: int, shot: int, query: int) -> bool:
        return len(self.eligible(shot + query)) >= way

    # -- replay
    def sample_task(self, way: int, shot: int, query: int, rng: np.random.Generator) -> Task:
        """A way-way shot-shot task with `query` queries per class, drawn from the classes that hold
        at least shot + query images; distinct images within a class; relative labels grouped by class."""
        pool = self.eligible(shot + query)
        if len(pool) < way:
            raise ValueError(f"TaskMemory.sample_task: {way}-way tasks of {shot}+{query} images per class need "
                             f"{way} classes with that many images, the memory has {len(pool)}; "
                             "check can_sample() first")
        classes = rng.choice(pool, size=way, replace=False)
        sup, qur = [], []
        for c in classes:
            batches = self._store[int(c)]
            sizes = np.array([b.shape[0] for b in batches])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            pick = rng.choice(int(sizes.sum()), size=shot + query, replace=False)
            which = np.searchsorted(starts, pick, side="right") - 1
            # gather batch by batch (a loop over at most max_batch_per_class batches), then restore pick order
            order = np.argsort(which, kind="stable")
            parts = [batches[int(w)][torch.from_numpy(pick[order][which[order] == w] - starts[w])]
                     for w in np.unique(which)]
            grouped = torch.cat(parts)
            imgs = torch.empty_like(grouped)
            imgs[torch.from_numpy(order)] = grouped
            sup.append(imgs[:shot]); qur.append(imgs[shot:])
        rel = torch.arange(way)
        to01 = lambda t: torch.cat(t).float().div_(255.0)   # noqa: E731
        return Task(to01(sup), rel.repeat_interleave(shot), to01(qur), rel.repeat_interleave(query),
                    np.asarray(classes, dtype=np.int64))

    # -- resume
    def state_dict(self) -> dict:
        return {"max_batch_per_class": self.max_batch_per_class, "image_size": self.image_size,
                "store": {c: list(b) for c, b in self._store.items()}}

    def load_state_dict(self, state: dict) -> None:
        if int(state["image_size"]) != self.image_size:
            raise CheckpointError(f"the checkpoint's task memory holds {state['image_size']}px images, this run "
                             f"uses {self.image_size}px; resume with the same --dataset/--backbone flags")
        self._store = {int(c): deque(bs, maxlen=self.max_batch_per_class) for c, bs in state["store"].items()}


def replay_capacity(max_batch_per_class: int, batch_sizes: tuple[int, ...]) -> int:
    """Most images a class can ever hold when every visit adds one batch of each size in `batch_sizes`
    (in that order) and the ring buffer keeps the last `max_batch_per_class` batches."""
    seq = list(batch_sizes) * (max_batch_per_class // max(1, len(batch_sizes)) + 2)
    return max(sum(seq[i:i + max_batch_per_class]) for i in range(len(seq) - max_batch_per_class + 1))


def check_replay_flags(num_sup_kd: int, num_qur_kd: int, num_sup_train: int, num_qur_train: int,
                       max_batch_per_class: int) -> str | None:
    """None when memory replay can work; else a one-line message naming the flags.

    Each API visit stores two batches per class (support: num_sup_kd images, query: num_qur_kd images);
    a replay task needs num_sup_train + num_qur_train distinct images of each of its classes.
    """
    need = num_sup_train + num_qur_train
    cap = replay_capacity(max_batch_per_class, (num_sup_kd, num_qur_kd))
    if cap >= need:
        return None
    return (f"memory replay needs {need} images per class (--num_sup_train {num_sup_train} + --num_qur_train "
            f"{num_qur_train}) but the memory can hold at most {cap} per class (--max_batch_per_class "
            f"{max_batch_per_class} syntheses of --num_sup_kd {num_sup_kd} / --num_qur_kd {num_qur_kd} images); "
            "raise --max_batch_per_class, --num_sup_kd or --num_qur_kd, or lower --num_sup_train/--num_qur_train")
