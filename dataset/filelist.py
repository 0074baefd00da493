"""Write the split CSVs (DFL2Ldata/<folder>/split/meta_{train,val,test}.csv) from an image tree.

Two layouts (the original README's):
- pre-split (CIFAR-FS, MiniImageNet): <folder>/{meta_train,meta_val,meta_test}/<class>/<image>;
  the `mete_*` spelling of the original README's tree is accepted too.
- CUB: <folder>/images/<class>/<image>, split by sorted class index i:
  even -> meta_train, i % 4 == 1 -> meta_val, i % 4 == 3 -> meta_test (100/50/50 of 200).

CSV: header `filename,label`; `filename` relative to the data root (a prepared tree can be moved),
`label` the class folder name; classes and files sorted, so class ids never depend on the file
system's listing order.
"""
from __future__ import annotations

import argparse
import csv
import os

from .specs import SPLITS, DatasetSpec, get_spec
from core.errors import DataError
from core.io import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
HOW_TO_GET = "docs/datasets.md"
TITLES = {"cifar100": "CIFAR-FS", "miniimagenet": "MiniImageNet", "cub": "CUB-200-2011"}

Row = tuple[str, str]   # (filename relative to the data root, class name)


def write_csv(path: str, rows: list[Row]) -> None:
    """Write a split CSV atomically (temp file, then rename): never a half-written split."""
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("filename", "label"))
        w.writerows(rows)
    atomic_write(path, write, binary=False)


def _missing(path: str, spec: DatasetSpec, what: str) -> DataError:
    hint = ""
    nested = os.path.join(path, os.path.basename(path))
    if os.path.isdir(nested):   # unzipping often adds one level: cifar100/cifar100/...
        hint = f" (found {nested}: move its contents up one level)"
    title = TITLES.get(spec.name, spec.name)
    return DataError(f"{what} {path}{hint}; download {title} and place it there ({HOW_TO_GET})")


def subfolders(path: str) -> list[str]:
    """Sorted names of the sub-folders of `path` (hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def images_of(path: str) -> list[str]:
    """Sorted names of the image files in `path`."""
    return sorted(e.name for e in os.scandir(path)
                  if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith("."))


def class_rows(data_root: str, split_dir: str, classes: list[str], spec: DatasetSpec) -> list[Row]:
    """Rows for the given class folders of `split_dir`, sorted by class then file."""
    rows = []
    for c in classes:
        files = images_of(os.path.join(split_dir, c))
        if not files:
            raise _missing(os.path.join(split_dir, c), spec, "no images (.png/.jpg) in")
        rel = os.path.relpath(os.path.join(split_dir, c), data_root).replace(os.sep, "/")
        rows += [(f"{rel}/{f}", c) for f in files]
    return rows


def find_split_dir(dataset_dir: str, split: str) -> str | None:
    """<dataset_dir>/meta_train, or the `mete_train` spelling; None when neither exists."""
    for name in (split, split.replace("meta_", "mete_", 1)):
        path = os.path.join(dataset_dir, name)
        if os.path.isdir(path):
            return path
    return None


def presplit_rows(data_root: str, spec: DatasetSpec) -> dict[str, list[Row]]:
    """Rows of each split of a pre-split dataset (CIFAR-FS, MiniImageNet)."""
    dataset_dir = os.path.join(data_root, spec.folder)
    if not os.path.isdir(dataset_dir):
        raise _missing(dataset_dir, spec, "no folder")
    out = {}
    for split in SPLITS:
        split_dir = find_split_dir(dataset_dir, split)
        if split_dir is None:
            raise _missing(os.path.join(dataset_dir, split), spec, "no folder")
        classes = subfolders(split_dir)
        if not classes:
            raise _missing(split_dir, spec, "no class folders in")
        out[split] = class_rows(data_root, split_dir, classes, spec)
    return out


def cub_split_of(index: int) -> str:
    """The split of the CUB class at sorted position `index`."""
    return "meta_train" if index % 2 == 0 else ("meta_val" if index % 4 == 1 else "meta_test")


def cub_rows(data_root: str, spec: DatasetSpec) -> dict[str, list[Row]]:
    """Rows of each split of CUB-200-2011 (images/<class>/*.jpg, split by class index)."""
    images_dir = os.path.join(data_root, spec.folder, "images")
    if not os.path.isdir(images_dir):
        raise _missing(images_dir, spec, "no folder")
    classes = subfolders(images_dir)
    if not classes:
        raise _missing(images_dir, spec, "no class folders in")
    return {split: class_rows(data_root, images_dir,
                              [c for i, c in enumerate(classes) if cub_split_of(i) == split], spec)
            for split in SPLITS}


def write_splits(data_root: str, spec: DatasetSpec, rows: dict[str, list[Row]], quiet: bool = False) -> None:
    """Write <data_root>/<folder>/split/<split>.csv and print one summary line per split."""
    for split in SPLITS:
        write_csv(os.path.join(data_root, spec.folder, "split", f"{split}.csv"), rows[split])
        if not quiet:
            n_classes = len({label for _, label in rows[split]})
            expected = spec.classes_in(split)
            note = "" if n_classes == expected else f" (note: {spec.name} normally has {expected})"
            print(f"{spec.name} {split}: {n_classes} classes, {len(rows[split])} images{note}")
    if not quiet:
        print(f"wrote {os.path.join(data_root, spec.folder, 'split')}/meta_{{train,val,test}}.csv")


def main(dataset: str, argv: list[str] | None = None) -> None:
    """The body of the write_*_filelist.py scripts."""
    spec = get_spec(dataset)
    p = argparse.ArgumentParser(description=f"Write the split CSVs of {spec.name} "
                                            f"({spec.folder}/split/meta_{{train,val,test}}.csv).")
    p.add_argument("--data_root", default="./DFL2Ldata", help="folder holding the datasets (default ./DFL2Ldata)")
    args = p.parse_args(argv)
    rows = cub_rows(args.data_root, spec) if dataset == "cub" else presplit_rows(args.data_root, spec)
    write_splits(args.data_root, spec, rows)
