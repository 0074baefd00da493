"""dataset/: the demo dataset, the split reader, the per-class train/val split, the episodic sampler and the
batched augmentation (one crop/flip per batch or per image)."""
from __future__ import annotations

import csv
import filecmp
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_IMAGES_PER_CLASS, SMALL_DEMO_IMAGES_PER_CLASS as N, run_cli
from dataset import (DataError, check_episode, fixed_tasks, get_spec, load_split, normalize, random_crop_flip,
                     resize, sample_task, task_rng, train_val_indices)
from dataset.demo import COLOURS, SHAPES, TEXTURES, class_table, ensure_demo

pytestmark = pytest.mark.fast

SPEC = get_spec("demo")


# ----------------------------------------------------------------------------- the demo dataset

def test_demo_layout(small_demo_root):
    """The demo dataset as ensure_demo writes it (the fast tier's small copy; the pool's: below)."""
    demo_root = small_demo_root
    folder = os.path.join(demo_root, "demo")
    for split, n_classes in zip(("meta_train", "meta_val", "meta_test"), (64, 16, 20)):
        classes = sorted(os.listdir(os.path.join(folder, split)))
        assert len(classes) == n_classes
        assert all(len(os.listdir(os.path.join(folder, split, c))) == N for c in classes)
        data = load_split(demo_root, SPEC, split)
        assert data.class_names == classes and data.num_classes == n_classes
        assert len(data.files) == n_classes * N
        x = data.images([0, len(data.files) - 1])
        assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert x.std() > 0.05                                            # not blank
    meta = json.load(open(os.path.join(folder, "demo.json")))
    assert meta["images_per_class"] == N and meta["seed"] == 0
    assert meta["classes"] == {"meta_train": 64, "meta_val": 16, "meta_test": 20}


def test_the_pools_demo_data_holds_what_the_suite_asked_for(demo_root):
    meta = json.load(open(os.path.join(demo_root, "demo", "demo.json")))
    assert meta["images_per_class"] == DEMO_IMAGES_PER_CLASS and meta["seed"] == 0
    assert len(load_split(demo_root, SPEC, "meta_train").files) == 64 * DEMO_IMAGES_PER_CLASS


def test_demo_classes_are_new_combinations_of_shared_parts():
    """Every colour, shape and texture occurs in meta_train; classes are distinct combinations."""
    table = class_table()
    assert len(set(table)) == 100
    train = table[:64]
    assert {c for c, _, _ in train} == set(COLOURS)
    assert {s for _, s, _ in train} == set(SHAPES)
    assert {t for _, _, t in train} == set(TEXTURES)


@pytest.mark.slow
def test_demo_is_deterministic(tmp_path):
    a = ensure_demo(str(tmp_path / "a"), images_per_class=3, seed=5, progress=False)
    b = ensure_demo(str(tmp_path / "b"), images_per_class=3, seed=5, progress=False)
    c = ensure_demo(str(tmp_path / "c"), images_per_class=3, seed=6, progress=False)
    rel = "meta_test/" + sorted(os.listdir(os.path.join(a, "meta_test")))[0] + "/0002.png"
    assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False)
    assert not filecmp.cmp(os.path.join(a, rel), os.path.join(c, rel), shallow=False)
    for split in ("meta_train", "meta_val", "meta_test"):
        csv_a = open(os.path.join(a, "split", f"{split}.csv")).read()
        assert csv_a == open(os.path.join(b, "split", f"{split}.csv")).read()
        assert csv_a == open(os.path.join(c, "split", f"{split}.csv")).read()   # same classes, files
    # Same request again: no-op (files untouched); another size: regenerated in place.
    mtime = os.path.getmtime(os.path.join(a, rel))
    assert ensure_demo(str(tmp_path / "a"), progress=False) == a
    assert ensure_demo(str(tmp_path / "a"), images_per_class=3, seed=5, progress=False) == a
    assert os.path.getmtime(os.path.join(a, rel)) == mtime
    ensure_demo(str(tmp_path / "a"), images_per_class=2, progress=False)
    assert json.load(open(os.path.join(a, "demo.json")))["images_per_class"] == 2
    assert len(os.listdir(os.path.join(a, "meta_val", os.listdir(os.path.join(a, "meta_val"))[0]))) == 2
    assert sorted(os.listdir(tmp_path / "a")) == [".demo.lock", "demo"]            # no temp leftovers


def test_interrupted_generation_is_not_mistaken_for_a_dataset(tmp_path, monkeypatch):
    import dataset.demo as demo
    calls = []

    def boom(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)
    real = demo.class_scenes
    monkeypatch.setattr(demo, "class_scenes", boom)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(str(tmp_path), images_per_class=100, progress=False)
    assert not os.path.exists(tmp_path / "demo")          # the partial output stays under a temp name
    assert [f for f in os.listdir(tmp_path) if f.startswith(".demo.tmp")]
    monkeypatch.setattr(demo, "class_scenes", real)
    demo.ensure_demo(str(tmp_path), images_per_class=2, progress=False)
    assert len(load_split(str(tmp_path), SPEC, "meta_val").files) == 32
    assert sorted(os.listdir(tmp_path)) == [".demo.lock", "demo"]            # stale temp folder removed


@pytest.mark.slow
def test_demo_cli(tmp_path):
    proc = run_cli(["-m", "dataset.demo", "--data_root", str(tmp_path), "--images_per_class", "2",
                    "--seed", "1", "--preview", str(tmp_path / "preview.png")])
    assert "64/16/20 classes" in proc.stdout
    from PIL import Image
    assert Image.open(tmp_path / "preview.png").size[1] == 10 * 32 * 2          # 10 classes, zoom 2
    rows = list(csv.DictReader(open(tmp_path / "demo" / "split" / "meta_test.csv")))
    assert len(rows) == 40 and rows[0]["filename"].startswith("demo/meta_test/c080_")
    assert all(os.path.isfile(tmp_path / r["filename"]) for r in rows)
    proc = run_cli(["-m", "dataset.demo", "--data_root", str(tmp_path), "--images_per_class", "0"], check=False)
    assert proc.returncode != 0 and proc.stderr.strip().startswith("error:")


# ----------------------------------------------------------------------------- split reader, 80/20 split

def test_train_val_indices(small_demo_root):
    data = load_split(small_demo_root, SPEC, "meta_train")
    classes = [3, 17, 40]
    tr, trl, va, val = train_val_indices(data, classes)
    n = N
    assert len(tr) == 3 * int(0.8 * n) and len(va) == 3 * (n - int(0.8 * n))
    assert set(trl.tolist()) == set(val.tolist()) == {0, 1, 2}           # relative labels
    assert not set(tr) & set(va)
    for rel, c in enumerate(classes):
        idx = data.indices_of(c)
        assert tr[trl == rel].tolist() == idx[:int(0.8 * n)].tolist()     # first 80% of the class trains
        assert (data.labels[va[val == rel]] == c).all()


def test_missing_split_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="write_cifar100_filelist.py") as e:
        load_split(str(tmp_path), get_spec("cifar100"), "meta_train")
    assert isinstance(e.value, Exception) and "\n" not in str(e.value)


def test_class_ids_follow_the_rows_of_the_split_csv_as_the_original_reads_them(small_demo_root, tmp_path):
    """The original numbers classes in the order of their first rows (its scripts write file-system order);
    ours are sorted, so both give the ids their writer meant, and a pool of the original names its classes."""
    src = os.path.join(small_demo_root, "demo", "split", "meta_test.csv")
    rows = list(csv.DictReader(open(src)))
    names = list(dict.fromkeys(r["label"] for r in rows))
    order = names[::-1]                                          # a file-system order: not sorted
    shuffled = [r for n in order for r in sorted((r for r in rows if r["label"] == n), key=lambda r: r["filename"],
                                                 reverse=True)]
    root = tmp_path / "root"
    os.makedirs(root / "demo" / "split")
    for name in ("meta_train", "meta_val"):
        os.symlink(os.path.join(small_demo_root, "demo", "split", f"{name}.csv"), root / "demo" / "split" / f"{name}.csv")
    with open(root / "demo" / "split" / "meta_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["filename", "label"])
        w.writeheader()
        w.writerows({"filename": os.path.relpath(os.path.join(small_demo_root, r["filename"]), root), "label": r["label"]}
                    for r in shuffled)
    import dataclasses
    copy = dataclasses.replace(SPEC, name="demo_copy")          # not "demo": it would be generated there anew
    theirs, ours = load_split(str(root), copy, "meta_test"), load_split(small_demo_root, SPEC, "meta_test")
    assert ours.class_names == sorted(ours.class_names) and theirs.class_names == order
    c = 2                                                        # the same class, under its two ids
    ids = theirs.indices_of(theirs.class_names.index(ours.class_names[c]))
    assert torch.equal(theirs.images(ids[::-1]), ours.images(ours.indices_of(c)))     # rows' order kept per class


# ----------------------------------------------------------------------------- sampler

def test_sample_task(small_demo_root):
    data = load_split(small_demo_root, SPEC, "meta_test")
    way, shot, query = 5, 2, 3
    task = sample_task(data, way, shot, query, np.random.default_rng(0))
    assert task.support_x.shape == (way * shot, 3, 32, 32) and task.query_x.shape == (way * query, 3, 32, 32)
    assert task.support_y.tolist() == [c for c in range(way) for _ in range(shot)]   # grouped, relative
    assert task.query_y.tolist() == [c for c in range(way) for _ in range(query)]
    assert len(set(task.classes.tolist())) == way                                   # distinct classes
    # The images really belong to the class their relative label names, and support != query.
    for rel, c in enumerate(task.classes):
        imgs = data.images(data.indices_of(int(c)))
        for x in torch.cat([task.support_x[task.support_y == rel], task.query_x[task.query_y == rel]]):
            assert (imgs == x).all(dim=(1, 2, 3)).sum() == 1
    sup = task.support_x.flatten(1)
    assert not any((sup == q).all(1).any() for q in task.query_x.flatten(1))


def test_sampler_is_reproducible(small_demo_root):
    data = load_split(small_demo_root, SPEC, "meta_val")
    t1 = sample_task(data, 5, 1, 2, task_rng(3, 7))
    t2 = sample_task(data, 5, 1, 2, task_rng(3, 7))
    t3 = sample_task(data, 5, 1, 2, task_rng(3, 8))
    assert np.array_equal(t1.classes, t2.classes) and torch.equal(t1.query_x, t2.query_x)
    assert not (np.array_equal(t1.classes, t3.classes) and torch.equal(t1.query_x, t3.query_x))
    a = [t.classes.tolist() for t in fixed_tasks(data, 5, 1, 1, 4, seed=0)]
    b = [t.classes.tolist() for t in fixed_tasks(data, 5, 1, 1, 4, seed=0)]
    assert a == b and len({tuple(c) for c in a}) > 1


def test_check_episode(small_demo_root):
    data = load_split(small_demo_root, SPEC, "meta_val")       # 16 classes
    check_episode(data, 16, 1, N - 1)
    with pytest.raises(DataError, match="way_test 17 exceeds the 16 classes of demo/meta_val"):
        check_episode(data, 17, 1, 1, "test")
    with pytest.raises(DataError, match="num_sup_test 5 \\+ num_qur_test"):
        check_episode(data, 5, 5, N)


# ----------------------------------------------------------------------------- augmentation

def crop_flip_params(x: torch.Tensor, out: torch.Tensor, pad: int) -> list[set]:
    """For each image, the (row offset, column offset, flip) draws that explain out[i] from x[i]."""
    xp = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    found = []
    for i in range(len(x)):
        ok = set()
        for oy in range(2 * pad + 1):
            for ox in range(2 * pad + 1):
                crop = xp[i, :, oy:oy + h, ox:ox + w]
                for flip in (False, True):
                    if torch.equal(crop.flip(-1) if flip else crop, out[i]):
                        ok.add((oy, ox, flip))
        assert ok, f"image {i} is not a crop/flip of its input"
        found.append(ok)
    return found


def test_batch_mode_draws_one_crop_and_flip_for_the_whole_batch(device):
    x = torch.rand(16, 3, 8, 8, device=device)
    gen = lambda s: torch.Generator(device=device).manual_seed(s)     # noqa: E731
    draws = set()
    for seed in range(12):
        found = crop_flip_params(x, random_crop_flip(x, pad=2, generator=gen(seed), per="batch"), pad=2)
        common = set.intersection(*found)
        assert len(common) == 1                              # one draw explains every image
        draws |= common
    assert len(draws) > 3 and {f for *_, f in draws} == {False, True}
    per_image = crop_flip_params(x, random_crop_flip(x, pad=2, generator=gen(0), per="image"), pad=2)
    assert not set.intersection(*per_image)                  # 16 independent draws never all agree here
    assert torch.equal(random_crop_flip(x, pad=2, generator=gen(3)), random_crop_flip(x, pad=2, generator=gen(3)))
    xg = x.clone().requires_grad_()
    random_crop_flip(xg, per="batch").sum().backward()       # the generator is trained through it
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="per"):
        random_crop_flip(x, per="pixel")


def test_normalize_and_resize(device):
    x = torch.rand(2, 3, 32, 32, device=device)
    n = normalize(x, SPEC.mean, SPEC.std)
    torch.testing.assert_close(n * 0.25 + 0.5, x)
    assert resize(x, 32) is x and resize(x, 84).shape == (2, 3, 84, 84)
