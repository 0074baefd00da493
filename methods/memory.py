"""Task memory: recovered images per absolute class, replayed as new few-shot tasks.

Each `add` stores, for every class it contains, one batch (one synthesis) in that class's ring
buffer of at most `max_batch_per_class` batches; the oldest batch is dropped first. Tasks are
drawn across *all* stored classes, so classes of different APIs meet in one task. Images are kept
as 8-bit pixels at the meta model's input size, a quarter of float32's memory: truncated as the
original's PNG files were (quantize "truncate"), or rounded; API-MH images are resized on the way in.

On disk (a run's checkpoint) the memory is a folder of append-only batch files plus an index:

    <folder>/batch_<id>.pt   one `add` (one recovered set): {"id", "images": {class: uint8 [n, C, S, S]}},
                             written once, at the first save after the add, never rewritten
    index (in last.pth)      {"batches": {class: [id, ...]} oldest first, "next_id", "owners": {id: API}, ...}

`save` writes only the batches added since the previous save and returns the index; once the
checkpoint holding the index is committed, `prune` deletes the files it no longer refers to. A
file written after the last committed index (a kill between the two) is never read: its id is
handed out again after resume and the file overwritten.
"""
from __future__ import annotations

import os
from collections import deque

import numpy as np
import torch

from core.errors import CheckpointError, FlagError
from core.io import atomic_torch_save, load_checkpoint
from dataset.augment import resize
from dataset.sampler import Task


PREVIEW = 8     # images per class kept inside the index for readers of last.pth (python -m reporting)


def batch_file(bid: int) -> str:
    return f"batch_{bid:08d}.pt"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TaskMemory:
    def __init__(self, max_batch_per_class: int = 20, image_size: int = 32, quantize: str = "round"):
        if max_batch_per_class < 1:
            raise FlagError(f"max_batch_per_class must be at least 1, got {max_batch_per_class}")
        if quantize not in ("round", "truncate"):
            raise ValueError(f"memory_quantize must be round or truncate, got {quantize!r}")
        self.quantize = quantize
        self.max_batch_per_class = int(max_batch_per_class)
        self.image_size = int(image_size)
        self._store: dict[int, deque] = {}     # class -> deque of (batch id, uint8 images)
        self._next_id = 0
        self._on_disk: set[int] = set()        # batch ids with a file as of the last save or load
        self._owner: dict[int, str] = {}       # batch id -> the API it was recovered from (when given)
        self.bytes_written = 0                 # by the last save

    # -- filling
    def add(self, images: torch.Tensor, labels, owner: str | None = None) -> int:
        """images [N, C, H, W] in [0, 1]; labels [N] absolute class ids. One batch per class present;
        owner: the API the images were recovered from (drop_owner removes them). Returns the batch id."""
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"TaskMemory.add: {images.shape[0]} images but {labels.shape[0]} labels")
        x = resize(images.detach().float(), self.image_size).cpu()
        pixels = x.clamp(0, 1).mul(255)
        pixels = (pixels.round() if self.quantize == "round" else pixels).to(torch.uint8)     # else: truncated
        if self._store:
            c_have = next(iter(self._store.values()))[0][1].shape[1]
            if pixels.shape[1] != c_have:
                raise ValueError(f"TaskMemory.add: {pixels.shape[1]}-channel images, memory holds {c_have}-channel")
        bid, self._next_id = self._next_id, self._next_id + 1
        if owner is not None:
            self._owner[bid] = owner
        for c in labels.unique().tolist():
            buf = self._store.setdefault(int(c), deque(maxlen=self.max_batch_per_class))
            buf.append((bid, pixels[labels == c].contiguous()))
        return bid

    def owner(self, bid: int) -> str | None:
        """The API batch `bid` was recovered from (None: not given)."""
        return self._owner.get(bid)

    def owned_by(self, owner: str) -> list[int]:
        """Ids of the batches held that were recovered from API `owner`."""
        held = {bid for buf in self._store.values() for bid, _ in buf}
        return sorted(b for b, o in self._owner.items() if o == owner and b in held)

    def drop_owner(self, owner: str) -> int:
        """Remove every batch recovered from API `owner`; returns how many images went."""
        gone = set(self.owned_by(owner))
        n = 0
        for c, buf in list(self._store.items()):
            keep = [(bid, b) for bid, b in buf if bid not in gone]
            n += sum(b.shape[0] for bid, b in buf if bid in gone)
            if keep:
                self._store[c] = deque(keep, maxlen=self.max_batch_per_class)
            else:
                del self._store[c]
        return n

    # -- what is in it
    @property
    def classes(self) -> list[int]:
        return sorted(self._store)

    def count(self, c: int) -> int:
        """Images held for absolute class c."""
        return sum(b.shape[0] for _, b in self._store.get(int(c), ()))

    def __len__(self) -> int:
        return sum(self.count(c) for c in self._store)

    def eligible(self, per_class: int) -> list[int]:
        """Classes holding at least `per_class` images."""
        return [c for c in self.classes if self.count(c) >= per_class]

    def can_sample(self, way: int, shot: int, query: int) -> bool:
        return len(self.eligible(shot + query)) >= way

    def counts(self) -> "BatchCounts":
        """The sizes of the batches held, per class, without the images (to plan a meta-batch)."""
        sizes = {c: [b.shape[0] for _, b in buf] for c, buf in self._store.items()}
        return BatchCounts(self.max_batch_per_class, sizes)

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
            batches = [b for _, b in self._store[int(c)]]
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

    def batches(self, c: int) -> list[torch.Tensor]:
        """The uint8 batches held for class c, oldest first."""
        return [b for _, b in self._store.get(int(c), ())]

    def items(self, c: int) -> list[tuple[int, torch.Tensor]]:
        """(batch id, uint8 images) held for class c, oldest first."""
        return list(self._store.get(int(c), ()))

    def equals(self, other: "TaskMemory") -> bool:
        """Same classes, same batches in the same order, same pixels."""
        if self.classes != other.classes:
            return False
        return all(len(self.batches(c)) == len(other.batches(c)) and
                   all(torch.equal(a, b) for a, b in zip(self.batches(c), other.batches(c))) for c in self.classes)

    # -- resume: everything in one dict (small memories, tests)
    def state_dict(self) -> dict:
        return {"max_batch_per_class": self.max_batch_per_class, "image_size": self.image_size,
                "store": {c: [b for _, b in buf] for c, buf in self._store.items()},
                "owners": {c: [self._owner.get(bid) for bid, _ in buf] for c, buf in self._store.items()}}

    def _check_size(self, state: dict) -> None:
        if int(state["image_size"]) != self.image_size:
            raise CheckpointError(f"the checkpoint's task memory holds {state['image_size']}px images, this run "
                             f"uses {self.image_size}px; resume with the same dataset and backbone settings")

    def load_state_dict(self, state: dict, folder: str | None = None) -> None:
        """A state_dict() or, with the folder of its batch files, an index from save()."""
        if "batches" in state:
            self.load(state, folder)
            return
        self._check_size(state)
        self._store, self._next_id, self._on_disk, self._owner = {}, 0, set(), {}
        for c, bs in state["store"].items():    # every batch gets an id; none has a file yet
            self._store[int(c)] = deque(((self._next_id + i, b) for i, b in enumerate(bs)),
                                        maxlen=self.max_batch_per_class)
            for i, o in enumerate(state.get("owners", {}).get(c, ())):
                if o is not None:
                    self._owner[self._next_id + i] = o
            self._next_id += len(bs)

    # -- resume: append-only batch files in a folder and an index (a run's checkpoint)
    def save(self, folder: str, preview: int = PREVIEW) -> dict:
        """Write the batches that have no file yet into `folder` (fsync'ed); return the index that
        refers to every batch held. `preview`: the first images of each class copied into the index."""
        new: dict[int, dict[int, torch.Tensor]] = {}
        for c, buf in self._store.items():
            for bid, b in buf:
                if bid not in self._on_disk:
                    new.setdefault(bid, {})[c] = b
        self.bytes_written = 0
        if new:
            os.makedirs(folder, exist_ok=True)
            for bid in sorted(new):
                path = os.path.join(folder, batch_file(bid))
                atomic_torch_save({"id": bid, "images": new[bid]}, path)
                self.bytes_written += os.path.getsize(path)
            _fsync_dir(folder)
        held = {c: [bid for bid, _ in buf] for c, buf in self._store.items()}
        self._on_disk = {bid for ids in held.values() for bid in ids}
        self._owner = {bid: o for bid, o in self._owner.items() if bid in self._on_disk}   # evicted batches go
        index = {"format": "batch_files", "max_batch_per_class": self.max_batch_per_class,
                 "image_size": self.image_size, "next_id": self._next_id, "batches": held,
                 "owners": dict(self._owner)}
        if preview:
            index["store"] = {c: [self._first(c, preview)] for c in self._store}
        return index

    def _first(self, c: int, k: int) -> torch.Tensor:
        out, n = [], 0
        for _, b in self._store[c]:
            out.append(b[:k - n])
            n += out[-1].shape[0]
            if n >= k:
                break
        return torch.cat(out)

    @staticmethod
    def prune(folder: str, index: dict) -> int:
        """Delete the batch files (and torn temporaries) in `folder` that `index` does not refer to;
        call it once the checkpoint holding `index` is committed. Returns how many were deleted."""
        keep = {batch_file(bid) for ids in index["batches"].values() for bid in ids}
        gone = 0
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith("batch_") and name not in keep:
                    os.remove(os.path.join(folder, name))
                    gone += 1
        return gone

    def load(self, index: dict, folder: str) -> None:
        """The memory an index from save() describes, read from its batch files in `folder`."""
        self._check_size(index)
        files: dict[int, dict] = {}
        store = {}
        for c, ids in index["batches"].items():
            buf = deque(maxlen=self.max_batch_per_class)
            for bid in ids:
                bid = int(bid)
                if bid not in files:
                    path = os.path.join(folder, batch_file(bid))
                    if not os.path.isfile(path):
                        raise CheckpointError(f"the task memory file {path} that the checkpoint refers to is "
                                              "missing; restore it, or pass --overwrite to start the run over")
                    files[bid] = load_checkpoint(path, what="task memory file",
                                                 hint="restore it, or pass --overwrite to start the run over")
                images = files[bid]["images"].get(int(c))
                if images is None:
                    raise CheckpointError(f"the task memory file {os.path.join(folder, batch_file(bid))} holds no "
                                          f"images of class {c}, which the checkpoint expects there; it is not "
                                          "this run's file")
                buf.append((bid, images))
            store[int(c)] = buf
        self._store, self._next_id, self._on_disk = store, int(index["next_id"]), set(files)
        self._owner = {int(b): o for b, o in index.get("owners", {}).items()}


class BatchCounts:
    """How many images each class's ring buffer would hold: TaskMemory's bookkeeping without the
    pixels. A meta-batch's API visits are planned with it (each visit adds a support and a query
    batch, and --screen_memory's spares, to each of its API's classes) before any of them runs,
    identically on every process."""

    def __init__(self, max_batch_per_class: int, sizes: dict[int, list[int]]):
        self._sizes = {c: deque(s, maxlen=max_batch_per_class) for c, s in sizes.items()}
        self._maxlen = max_batch_per_class

    def add(self, classes, *batch_sizes: int) -> None:
        """One batch of each size, in order, for every class (as TaskMemory.add does per recovered set)."""
        for n in batch_sizes:
            for c in classes:
                self._sizes.setdefault(int(c), deque(maxlen=self._maxlen)).append(int(n))

    def can_sample(self, way: int, shot: int, query: int) -> bool:
        return sum(sum(s) >= shot + query for s in self._sizes.values()) >= way


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
            "raise max_batch_per_class, num_sup_kd or num_qur_kd, or lower num_sup_train/num_qur_train")
