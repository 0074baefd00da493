"""The write_*_filelist.py scripts on small generated trees of each dataset's layout."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli

pytestmark = pytest.mark.fast

SPLITS = ("meta_train", "meta_val", "meta_test")


def _image(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 127, np.uint8)).save(path)


def _read(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _presplit_tree(root: str, folder: str, spelling: str, ext: str) -> dict[str, dict[str, list[str]]]:
    """<root>/<folder>/<spelling>_{train,val,test}/<class>/<k>.<ext>; classes and files created in
    reverse order, so a script that relies on listing order gets it wrong."""
    made = {}
    sizes = {"train": (4, 3), "val": (2, 2), "test": (3, 4)}     # (classes, images per class)
    for part, (n_classes, n_images) in sizes.items():
        split = f"meta_{part}"
        made[split] = {}
        for c in reversed(range(n_classes)):
            name = f"{part}_class{c}"
            files = [f"img{k:02d}.{ext}" for k in reversed(range(n_images))]
            for f in files:
                _image(os.path.join(root, folder, f"{spelling}_{part}", name, f))
            made[split][name] = sorted(files)
    return made


def _check_csvs(root: str, folder: str, made: dict, split_dirs: dict[str, str]) -> None:
    for split in SPLITS:
        rows = _read(os.path.join(root, folder, "split", f"{split}.csv"))
        assert list(rows[0]) == ["filename", "label"]
        expected = [(f"{folder}/{split_dirs[split]}/{c}/{f}", c)
                    for c in sorted(made[split]) for f in made[split][c]]
        assert [(r["filename"], r["label"]) for r in rows] == expected      # sorted by class, then file
        for r in rows:                                                      # relative to the data root
            assert not os.path.isabs(r["filename"])
            assert os.path.isfile(os.path.join(root, r["filename"]))


@pytest.mark.parametrize("script,folder,spelling,ext", [
    ("write_cifar100_filelist.py", "cifar100", "meta", "png"),
    ("write_cifar100_filelist.py", "cifar100", "mete", "png"),         # the original README's spelling
    ("write_miniimagenet_filelist.py", "Miniimagenet", "meta", "jpg"),
    ("write_miniimagenet_filelist.py", "Miniimagenet", "mete", "jpg"),
])
def test_presplit_datasets(tmp_path, script, folder, spelling, ext):
    root = str(tmp_path / "data")
    made = _presplit_tree(root, folder, spelling, ext)
    proc = run_cli([script, "--data_root", root])
    split_dirs = {s: s.replace("meta_", f"{spelling}_") for s in SPLITS}
    _check_csvs(root, folder, made, split_dirs)
    assert "meta_train: 4 classes, 12 images" in proc.stdout
    assert "meta_val: 2 classes, 4 images" in proc.stdout
    assert "meta_test: 3 classes, 12 images" in proc.stdout


def test_split_reader_reads_what_the_script_wrote(tmp_path):
    """Class ids are the sorted class names, whatever order the folders were created in."""
    from dataset import get_spec, load_split
    root = str(tmp_path / "data")
    _presplit_tree(root, "cifar100", "meta", "png")
    run_cli(["write_cifar100_filelist.py", "--data_root", root])
    data = load_split(root, get_spec("cifar100"), "meta_train")
    assert data.class_names == [f"train_class{c}" for c in range(4)]
    assert data.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert data.images([0, 5]).shape == (2, 3, 32, 32)                 # 8x8 files resized to the spec


def test_cub_split_rule(tmp_path):
    root = str(tmp_path / "data")
    names = [f"{i + 1:03d}.Bird_{chr(ord('a') + i)}" for i in range(10)]
    for name in reversed(names):
        for k in (2, 0, 1):
            _image(os.path.join(root, "CUB_200_2011", "images", name, f"{name}_{k}.jpg"))
    proc = run_cli(["write_CUB_filelist.py", "--data_root", root])
    expected = {"meta_train": [names[i] for i in (0, 2, 4, 6, 8)],
                "meta_val": [names[i] for i in (1, 5, 9)],
                "meta_test": [names[i] for i in (3, 7)]}
    for split in SPLITS:
        rows = _read(os.path.join(root, "CUB_200_2011", "split", f"{split}.csv"))
        assert [(r["filename"], r["label"]) for r in rows] == [
            (f"CUB_200_2011/images/{c}/{c}_{k}.jpg", c) for c in expected[split] for k in range(3)]
        assert all(os.path.isfile(os.path.join(root, r["filename"])) for r in rows)
    assert "meta_train: 5 classes, 15 images" in proc.stdout
    assert "meta_val: 3 classes, 9 images" in proc.stdout


def test_reruns_are_identical(tmp_path):
    root = str(tmp_path / "data")
    _presplit_tree(root, "Miniimagenet", "meta", "jpg")
    run_cli(["write_miniimagenet_filelist.py", "--data_root", root])
    first = open(os.path.join(root, "Miniimagenet", "split", "meta_val.csv"), "rb").read()
    run_cli(["write_miniimagenet_filelist.py", "--data_root", root])
    assert open(os.path.join(root, "Miniimagenet", "split", "meta_val.csv"), "rb").read() == first


@pytest.mark.parametrize("script,missing", [
    ("write_cifar100_filelist.py", "cifar100"),
    ("write_miniimagenet_filelist.py", "Miniimagenet"),
    ("write_CUB_filelist.py", os.path.join("CUB_200_2011", "images")),
])
def test_missing_dataset_is_one_clear_error(tmp_path, script, missing):
    proc = run_cli([script, "--data_root", str(tmp_path)], check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error:")
    assert os.path.join(str(tmp_path), missing) in lines[0] and "docs/datasets.md" in lines[0]


def test_missing_split_and_empty_class_are_named(tmp_path):
    root = str(tmp_path / "data")
    _presplit_tree(root, "cifar100", "meta", "png")
    empty = os.path.join(root, "cifar100", "meta_val", "val_class9")
    os.makedirs(empty)
    proc = run_cli(["write_cifar100_filelist.py", "--data_root", root], check=False)
    assert proc.returncode != 0 and empty in proc.stderr and "Traceback" not in proc.stderr
    os.rmdir(empty)
    os.rename(os.path.join(root, "cifar100", "meta_test"), os.path.join(root, "cifar100", "other"))
    proc = run_cli(["write_cifar100_filelist.py", "--data_root", root], check=False)
    assert proc.returncode != 0 and os.path.join(root, "cifar100", "meta_test") in proc.stderr
    assert not os.path.exists(os.path.join(root, "cifar100", "split", "meta_test.csv"))
