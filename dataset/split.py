"""Read a prepared split (DFL2Ldata/<folder>/split/<split>.csv) and serve its images.

CSV format (written by the write_*_filelist.py scripts): header `filename,label`, one row per
image, `filename` relative to the data root, `label` the class folder name. Class ids are in the order
of the classes' first rows, and a class's images in the order of their rows, as the original reads
its CSVs: our scripts sort classes and files, so ids never depend on file-system order, while a split
written by the original's scripts (file-system order) gives the ids its API pools name. Images are
decoded lazily, once, into a uint8 array.
"""
from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from core.errors import DataError
from .specs import SPLITS, DatasetSpec


def split_csv_path(data_root: str, spec: DatasetSpec, split: str) -> str:
    return os.path.join(data_root, spec.folder, "split", f"{split}.csv")


def read_split_csv(path: str) -> tuple[list[str], list[str]]:
    """Return (filenames, class names) of a split CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or set(rows[0]) != {"filename", "label"}:
        raise DataError(f"{path} is empty or has no `filename,label` header; rewrite it with the "
                        "dataset's write_*_filelist.py script")
    return [r["filename"] for r in rows], [r["label"] for r in rows]


@dataclass
class SplitData:
    """One split of one dataset: file list, integer labels, lazily decoded pixels."""
    spec: DatasetSpec
    split: str
    root: str                       # data root the filenames are relative to
    files: list[str]
    labels: np.ndarray              # int64 class id per file, 0..num_classes-1
    class_names: list[str]
    _pixels: np.ndarray = field(init=False, repr=False)
    _loaded: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        s, c = self.spec.image_size, self.spec.channels
        self._pixels = np.zeros((len(self.files), c, s, s), dtype=np.uint8)
        self._loaded = np.zeros(len(self.files), dtype=bool)
        self._by_class = [np.flatnonzero(self.labels == k) for k in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices_of(self, class_id: int) -> np.ndarray:
        """File indices of one class, in CSV (sorted) order."""
        return self._by_class[class_id]

    def images(self, indices) -> torch.Tensor:
        """Float images in [0, 1], shape [n, C, S, S], for the given file indices."""
        indices = np.asarray(indices, dtype=np.int64)
        for i in indices[~self._loaded[indices]]:
            self._pixels[i] = self._decode(self.files[i])
            self._loaded[i] = True
        return torch.from_numpy(self._pixels[indices]).float().div_(255.0)

    def _decode(self, rel: str) -> np.ndarray:
        path = os.path.join(self.root, rel)
        try:
            img = Image.open(path)
            img = img.convert("RGB" if self.spec.channels == 3 else "L")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path} ({e}); re-download the dataset "
                            f"(docs/datasets.md) and rerun {self.spec.filelist_script}") from None
        s = self.spec.image_size
        if img.size != (s, s):
            img = img.resize((s, s), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_split(data_root: str, spec: DatasetSpec, split: str) -> SplitData:
    """Open one split; the demo dataset is generated on first use."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = split_csv_path(data_root, spec, split)
    if spec.name == "demo":
        from .demo import ensure_demo
        ensure_demo(data_root)
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: prepare {spec.name} by placing it under "
                        f"{os.path.join(data_root, spec.folder)} (docs/datasets.md) and running "
                        f"`{spec.filelist_script} --data_root {data_root}`")
    files, names = read_split_csv(path)
    class_names = list(dict.fromkeys(names))       # in order of first appearance
    ids = {n: k for k, n in enumerate(class_names)}
    labels = np.array([ids[n] for n in names], dtype=np.int64)
    return SplitData(spec, split, data_root, files, labels, class_names)


def train_val_indices(data: SplitData, class_ids, train_fraction: float = 0.8):
    """Per-class split used to pretrain an API: the first 80% of each class's images (sorted
    order) train, the rest validate. Returns (train_idx, train_labels, val_idx, val_labels) with
    labels relative to `class_ids` (0..len-1)."""
    tr, trl, va, val = [], [], [], []
    for rel, c in enumerate(class_ids):
        idx = data.indices_of(int(c))
        if len(idx) < 2:
            raise DataError(f"class {data.class_names[c]!r} of {data.spec.name}/{data.split} has "
                            f"{len(idx)} image(s); need at least 2 to train and validate")
        n_train = min(max(1, int(len(idx) * train_fraction)), len(idx) - 1)
        tr.append(idx[:n_train]); trl.append(np.full(n_train, rel))
        va.append(idx[n_train:]); val.append(np.full(len(idx) - n_train, rel))
    cat = np.concatenate
    return cat(tr), cat(trl).astype(np.int64), cat(va), cat(val).astype(np.int64)


def load_images(data, indices: np.ndarray, workers: int) -> torch.Tensor:
    """data.images(indices), decoded by `workers` threads (PIL releases the GIL while decoding)."""
    if workers <= 1 or len(indices) < 2 * workers:
        return data.images(indices)
    chunks = np.array_split(indices, workers)
    with ThreadPoolExecutor(workers) as ex:
        return torch.cat(list(ex.map(data.images, chunks)))
