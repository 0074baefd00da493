"""methods/memory.py and methods/replay.py: the task memory of recovered images. Tasks drawn from it mix the
classes of several APIs and never put an image under another class's label; each class keeps its last
max_batch_per_class syntheses; on disk it is append-only batch files plus an index (a save writes only what
changed, files the committed index no longer names are pruned, a kill between the two is harmless, older
checkpoints still load); the visit planner's counts say what the memory would; replay tasks come from
(seed, task id) alone."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from core.config import Config
from core.errors import CheckpointError, FlagError
from core.seeding import task_rng
from methods.memory import BatchCounts, TaskMemory, batch_file, check_replay_flags, replay_capacity
from methods.replay import augmented, draw_replay

from conftest import DEVICE
from helpers_traced_main import memory_digest

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow


def class_images(c: int, n: int, size: int = 32, batch: int = 0) -> torch.Tensor:
    """n images whose channel 0 encodes the class id and channel 1 the batch (synthesis) number, exact in
    8 bits; made on the test device, as a visit's are (the memory keeps them on the CPU)."""
    x = torch.zeros(n, 3, size, size, device=DEVICE)
    x[:, 0] = c / 255.0
    x[:, 1] = batch / 255.0
    return x


def tags(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class id, batch number) each image carries."""
    return (x[:, 0, 0, 0] * 255).round().long(), (x[:, 1, 0, 0] * 255).round().long()


# Three APIs whose classes overlap (7 and 9 in APIs 1 and 2, 3 in APIs 1 and 3), 6 images per class each.
APIS = {1: [3, 7, 9, 12, 40], 2: [7, 9, 50, 51, 52], 3: [3, 60, 61, 62, 63]}


def filled_memory() -> TaskMemory:
    mem = TaskMemory(max_batch_per_class=20, image_size=32)
    for api, classes in APIS.items():                 # one synthesis per API, tagged with the API's number
        mem.add(torch.cat([class_images(c, 6, batch=api) for c in classes]), torch.tensor(classes).repeat_interleave(6))
    return mem


def test_memory_tasks_mix_the_classes_of_different_apis_and_keep_each_image_under_its_class():
    mem = filled_memory()
    assert mem.classes == sorted({c for cs in APIS.values() for c in cs})
    assert mem.count(7) == 12 and mem.count(40) == 6 and len(mem) == 90
    holders = {c: {a for a, cs in APIS.items() if c in cs} for c in mem.classes}
    rng = np.random.default_rng(0)
    mixed, shared_sources = 0, {7: set(), 9: set(), 3: set()}
    for _ in range(30):
        t = mem.sample_task(5, 2, 3, rng)
        assert t.support_x.shape == (10, 3, 32, 32) and t.query_x.shape == (15, 3, 32, 32)
        assert t.support_y.tolist() == [k for k in range(5) for _ in range(2)]
        assert t.query_y.tolist() == [k for k in range(5) for _ in range(3)]
        classes = t.classes.tolist()
        assert len(set(classes)) == 5
        for x, y in ((t.support_x, t.support_y), (t.query_x, t.query_y)):
            ids, api = tags(x)
            assert torch.equal(ids, torch.as_tensor(classes)[y])              # never under another label
            for c, a in zip(ids.tolist(), api.tolist()):
                assert a in holders[c]                                          # from a synthesis of that class
                if c in shared_sources:
                    shared_sources[c].add(a)
        if not any(set(classes) <= set(cs) for cs in APIS.values()):
            mixed += 1                                                          # no single API has these classes
    # 5 of 13 classes drawn uniformly fall inside one API's 5 classes with probability 3 / C(13, 5) < 0.3%
    assert mixed >= 25, f"only {mixed} of 30 tasks mixed classes of different APIs"
    assert all(len(s) == 2 for s in shared_sources.values()), shared_sources   # shared classes: both syntheses


def test_memory_draws_distinct_images_within_a_class():
    mem = TaskMemory(20, 32)
    x = torch.rand(12, 3, 32, 32)
    mem.add(x, [1] * 6 + [2] * 6)
    t = mem.sample_task(2, 2, 4, np.random.default_rng(3))
    for rel in range(2):
        rows = torch.cat([t.support_x[t.support_y == rel], t.query_x[t.query_y == rel]]).flatten(1)
        assert len({tuple(r.tolist()) for r in rows}) == 6                  # all six, none twice


def test_memory_ring_buffer_skips_small_classes_and_never_crashes():
    mem = TaskMemory(max_batch_per_class=3, image_size=32)
    for b in range(5):
        mem.add(class_images(1, 4, batch=b), [1] * 4)
    assert mem.count(1) == 12
    t = mem.sample_task(1, 4, 8, np.random.default_rng(0))
    kept = set(tags(torch.cat([t.support_x, t.query_x]))[1].tolist())
    assert kept == {2, 3, 4}                          # the two oldest syntheses were dropped
    mem.add(class_images(2, 2), [2, 2])               # too small for 1 + 2 images
    mem.add(class_images(3, 3), [3, 3, 3])
    assert not mem.can_sample(3, 1, 2) and mem.can_sample(2, 1, 2) and mem.eligible(3) == [1, 3]
    for seed in range(10):
        assert set(mem.sample_task(2, 1, 2, np.random.default_rng(seed)).classes.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="can_sample"):
        mem.sample_task(3, 1, 2, np.random.default_rng(0))
    assert not TaskMemory(20, 32).can_sample(5, 1, 15)


def test_memory_add_checks_its_input():
    with pytest.raises(FlagError, match="max_batch_per_class must be at least 1"):
        TaskMemory(0)
    mem = TaskMemory(4, 32)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        mem.add(torch.rand(3, 3, 32, 32), [1, 2])
    mem.add(torch.rand(2, 3, 32, 32), [1, 2])
    with pytest.raises(ValueError, match="1-channel images, memory holds 3-channel"):
        mem.add(torch.rand(2, 1, 32, 32), [1, 2])
    mem.add(torch.full((1, 3, 32, 32), 2.0), [5])     # stored as 8-bit pixels, clamped to [0, 1]
    assert mem.batches(5)[0].dtype == torch.uint8 and int(mem.batches(5)[0].max()) == 255
    assert pixels(mem) == 3 * 3 * 32 * 32


def pixels(memory) -> int:
    """Bytes of 8-bit pixels a TaskMemory holds."""
    return sum(b.numel() for c in memory.classes for b in memory.batches(c))


def test_memory_digest_and_equality():
    a, b = filled_memory(), filled_memory()
    assert a.equals(b) and memory_digest(a) == memory_digest(b)
    b.add(class_images(3, 6, batch=9), [3] * 6)
    assert not a.equals(b) and memory_digest(a) != memory_digest(b)
    a.add(class_images(3, 6, batch=8), [3] * 6)                 # same shapes, other pixels
    assert not a.equals(b) and memory_digest(a) != memory_digest(b)


def test_memory_resizes_and_round_trips_its_state(tmp_path):
    mem = TaskMemory(max_batch_per_class=4, image_size=84)
    mem.add(torch.cat([class_images(c, 5) for c in (64, 130)]), [64] * 5 + [130] * 5)
    path = str(tmp_path / "mem.pth")
    torch.save(mem.state_dict(), path)
    again = TaskMemory(max_batch_per_class=4, image_size=84)
    again.load_state_dict(torch.load(path, weights_only=True))
    a = mem.sample_task(2, 2, 3, np.random.default_rng(5))
    b = again.sample_task(2, 2, 3, np.random.default_rng(5))
    assert a.support_x.shape[-1] == 84
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    with pytest.raises(CheckpointError, match="84px"):
        TaskMemory(4, image_size=32).load_state_dict(mem.state_dict())


def test_replay_flag_check():
    assert check_replay_flags(30, 30, 5, 15, 20) is None           # the original's defaults
    assert check_replay_flags(3, 3, 1, 5, 2) is None                 # the last two syntheses hold 3 + 3
    msg = check_replay_flags(3, 3, 1, 5, 1)                          # one synthesis of 3 < 1 + 5, ever
    assert msg and "at most 3" in msg and "--max_batch_per_class 1" in msg and "--num_sup_train 1" in msg
    assert replay_capacity(1, (3, 5)) == 5 and replay_capacity(2, (3, 5)) == 8 and replay_capacity(3, (3, 5)) == 13


def test_planned_counts_follow_the_memory():
    """The visit planner decides from BatchCounts: it must say what the memory itself would say."""
    mem, gen = TaskMemory(3, image_size=4), torch.Generator().manual_seed(0)
    counts = mem.counts()
    for step in range(12):
        classes = torch.randperm(9, generator=gen)[:4].tolist()
        for n in (2, 5):        # a visit: a support and a query set
            mem.add(torch.rand(4 * n, 3, 4, 4, generator=gen), torch.tensor(classes).repeat_interleave(n))
        counts.add(classes, 2, 5)
        for way, shot, query in ((2, 1, 1), (4, 3, 4), (5, 6, 6), (8, 1, 6), (9, 2, 2)):
            assert counts.can_sample(way, shot, query) == mem.can_sample(way, shot, query), (step, way, shot, query)
        fresh = mem.counts()    # and a plan made from the memory as it is now agrees too
        assert all(fresh.can_sample(w, 1, q) == mem.can_sample(w, 1, q) for w in range(1, 10) for q in range(1, 12))
    assert isinstance(counts, BatchCounts)


# ------------------------------------------------------------------ replay tasks (methods/replay.py)

def test_replay_tasks_come_from_seed_and_task_id_alone():
    mem = filled_memory()
    cfg = Config(way_train=5, num_sup_train=2, num_qur_train=3, seed=11)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = draw_replay(mem, cfg, 7, DEVICE)
    draw_replay(mem, cfg, 8, DEVICE)
    b = draw_replay(mem, cfg, 7, DEVICE)
    assert torch.equal(torch.get_rng_state(), before)                  # the global RNG as it was
    assert np.array_equal(a.classes, b.classes) and torch.equal(a.support_x, b.support_x)
    assert torch.equal(a.query_x, b.query_x) and a.support_x.device.type == DEVICE.type
    c = draw_replay(mem, Config(way_train=5, num_sup_train=2, num_qur_train=3, seed=12), 7, DEVICE)
    assert not (np.array_equal(a.classes, c.classes) and torch.equal(a.query_x, c.query_x))
    # replay_augment crops and flips the same task's images (support first, then query), labels untouched
    aug = draw_replay(mem, Config(way_train=5, num_sup_train=2, num_qur_train=3, seed=11, replay_augment=True), 7,
                      DEVICE)
    assert np.array_equal(aug.classes, a.classes) and torch.equal(aug.support_y, a.support_y)
    assert not torch.equal(aug.support_x, a.support_x) and aug.support_x.shape == a.support_x.shape
    g1, g2 = torch.Generator(device=DEVICE).manual_seed(5), torch.Generator(device=DEVICE).manual_seed(5)
    from dataset import random_crop_flip
    t = augmented(a, g1)
    assert torch.equal(t.support_x, random_crop_flip(a.support_x, generator=g2))
    assert torch.equal(t.query_x, random_crop_flip(a.query_x, generator=g2))


def test_replay_mix_interpolates_each_class_with_a_second_task():
    """--replay_mix: class k of the task mixed with class k of a second memory task, x = λ x1 + (1 − λ) x2 with
    one λ ~ Beta(α, α) per task, labels of the first; the first task is the faithful draw, the second and λ
    come after it from the same (seed, task id) stream."""
    mem = TaskMemory(4, image_size=4)
    for c in range(8):      # every image of class c has the value c / 10
        mem.add(torch.full((6, 3, 4, 4), c / 10.0), torch.full((6,), c))
    base = dict(way_train=5, num_sup_train=1, num_qur_train=2, seed=3)
    plain = draw_replay(mem, Config(**base), 9, DEVICE)
    mixed = draw_replay(mem, Config(**base, replay_mix=0.5), 9, DEVICE)
    assert np.array_equal(mixed.classes, plain.classes) and torch.equal(mixed.query_y, plain.query_y)
    rng = task_rng(3, 9)
    first, second = (mem.sample_task(5, 1, 2, rng) for _ in range(2))
    lam = float(rng.beta(0.5, 0.5))
    assert torch.equal(first.support_x, plain.support_x.cpu()) and 0 < lam < 1
    for got, a, b in ((mixed.support_x, first.support_x, second.support_x), (mixed.query_x, first.query_x, second.query_x)):
        assert torch.allclose(got.cpu(), lam * a + (1 - lam) * b, atol=1e-6)
    assert not torch.equal(mixed.support_x, plain.support_x)


# ------------------------------------------------------------------ on disk: batch files and an index


def _visit_images(mem: TaskMemory, rng: np.random.Generator, classes, per_class: int) -> None:
    """What one visit adds: a support and a query set of `per_class` images for each of 5 classes."""
    for _ in range(2):
        labels = np.repeat(classes, per_class)
        mem.add(torch.from_numpy(rng.random((len(labels), 3, 32, 32), dtype=np.float32)), torch.from_numpy(labels))


def _mh_memory(visits: int, max_batch: int = 6, seed: int = 0) -> tuple[TaskMemory, np.random.Generator]:
    """An API-MH-shaped memory (84x84, classes of the three datasets' 228-class space), small."""
    rng = np.random.default_rng(seed)
    mem = TaskMemory(max_batch, image_size=84)
    for _ in range(visits):
        _visit_images(mem, rng, rng.choice(228, size=5, replace=False), 6)
    return mem, rng


def _files(folder: str) -> set[str]:
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def test_memory_files_round_trip_and_a_save_writes_only_the_new_visit(tmp_path):
    folder = str(tmp_path / "memory")
    mem, rng = _mh_memory(40)
    index = mem.save(folder, preview=0)
    TaskMemory.prune(folder, index)
    assert mem.bytes_written > pixels(mem)                 # the first save writes everything
    again = TaskMemory(6, image_size=84)
    again.load(index, folder)
    assert again.equals(mem) and len(again) == len(mem) and memory_digest(again) == memory_digest(mem)
    a, b = (m.sample_task(5, 2, 3, np.random.default_rng(1)) for m in (mem, again))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)

    _visit_images(mem, rng, [3, 70, 130, 200, 227], 6)       # one more visit, then a save
    visit_bytes = 2 * 5 * 6 * 3 * 84 * 84
    index = mem.save(folder, preview=0)
    assert mem.bytes_written < 1.2 * visit_bytes + 8192      # that visit (and file headers), nothing else
    assert mem.bytes_written < 0.05 * pixels(mem)
    assert mem.save(folder, preview=0) == index and mem.bytes_written == 0      # nothing new: nothing written
    torch.save(index, str(tmp_path / "index.pth"))
    assert os.path.getsize(str(tmp_path / "index.pth")) < 0.01 * pixels(mem)  # the index is small
    TaskMemory.prune(folder, index)
    again = TaskMemory(6, image_size=84)
    again.load(index, folder)
    assert again.equals(mem)


def test_memory_files_of_evicted_batches_are_pruned_after_the_commit(tmp_path):
    folder = str(tmp_path / "memory")
    mem = TaskMemory(2, image_size=32)
    rng = np.random.default_rng(0)
    for _ in range(3):
        _visit_images(mem, rng, [0, 1, 2, 3, 4], 2)
        index = mem.save(folder)
        assert len(_files(folder)) >= 2
        TaskMemory.prune(folder, index)
        assert _files(folder) == {batch_file(b) for ids in index["batches"].values() for b in ids}
    assert len(_files(folder)) == 2                          # the ring buffer holds the last 2 sets per class
    assert set(index["store"]) == set(mem.classes)           # the preview for readers of last.pth
    assert torch.equal(index["store"][0][0], torch.cat(mem.batches(0))[:8])


def test_memory_after_a_kill_between_its_files_and_the_checkpoint(tmp_path):
    """Files written after the last committed index are ignored, then overwritten."""
    folder = str(tmp_path / "memory")
    mem, rng = _mh_memory(10)
    committed = mem.save(folder, preview=0)
    TaskMemory.prune(folder, committed)
    snapshot = TaskMemory(6, 84)
    snapshot.load(committed, folder)
    _visit_images(mem, rng, [1, 2, 3, 4, 5], 6)
    mem.save(folder, preview=0)                              # files of the visit written; killed before last.pth
    new_ids = set(_files(folder)) - {batch_file(b) for ids in committed["batches"].values() for b in ids}
    assert new_ids
    with open(os.path.join(folder, sorted(new_ids)[0]) + ".tmp123", "wb") as f:
        f.write(b"torn")                                     # and a torn temporary of the next file

    resumed = TaskMemory(6, 84)
    resumed.load(committed, folder)
    assert resumed.equals(snapshot)
    _visit_images(resumed, np.random.default_rng(99), [1, 2, 3, 4, 5], 6)   # the repeated visit differs
    index = resumed.save(folder, preview=0)
    TaskMemory.prune(folder, index)
    check = TaskMemory(6, 84)
    check.load(index, folder)
    assert check.equals(resumed) and not check.equals(mem)
    assert not any(".tmp" in n for n in _files(folder))


def test_memory_checkpoint_of_earlier_versions_still_loads(tmp_path):
    mem, _ = _mh_memory(5)
    old = mem.state_dict()                                    # images inside the checkpoint
    again = TaskMemory(6, 84)
    again.load_state_dict(old, folder=str(tmp_path / "memory"))
    assert again.equals(mem)
    index = again.save(str(tmp_path / "memory"), preview=0)  # the first save writes every batch
    assert again.bytes_written > pixels(mem)
    check = TaskMemory(6, 84)
    check.load_state_dict(index, folder=str(tmp_path / "memory"))
    assert check.equals(mem)


def test_missing_or_foreign_memory_file_is_one_clear_line(tmp_path):
    folder = str(tmp_path / "memory")
    mem, _ = _mh_memory(2)
    index = mem.save(folder, preview=0)
    os.rename(os.path.join(folder, batch_file(0)), str(tmp_path / "kept.pt"))
    with pytest.raises(CheckpointError, match="missing") as e:
        TaskMemory(6, 84).load(index, folder)
    assert "\n" not in str(e.value)
    other = TaskMemory(6, 84)                                 # another run's file under that name
    other.add(class_images(227, 2, size=84), [227, 227])
    other.save(str(tmp_path / "other"), preview=0)
    os.rename(str(tmp_path / "other" / batch_file(0)), os.path.join(folder, batch_file(0)))
    with pytest.raises(CheckpointError, match="holds no images of class") as e:
        TaskMemory(6, 84).load(index, folder)
    assert "not this run's file" in str(e.value) and "\n" not in str(e.value)


def test_memory_pixels_are_truncated_as_the_originals_pngs_or_rounded():
    values = torch.tensor([0.0, 0.499, 0.6, 1.7, 254.4, 254.6, 255.0, 128.9, 3.5]) / 255
    held = {}
    for mode in ("truncate", "round"):
        mem = TaskMemory(2, image_size=3, quantize=mode)
        mem.add(values.view(1, 1, 3, 3), torch.tensor([0]))
        held[mode] = mem.batches(0)[0].flatten().tolist()
    assert held["truncate"] == [0, 0, 0, 1, 254, 254, 255, 128, 3]      # the original: (x * 255).astype(uint8)
    assert held["round"] == [0, 0, 1, 2, 254, 255, 255, 129, 4]
    assert Config().memory_quantize == "truncate"
    with pytest.raises(ValueError, match="truncate"):
        TaskMemory(2, quantize="nearest")


def test_memory_drops_the_batches_of_one_api_and_remembers_owners_across_saves(tmp_path):
    """--api_trust: the sets of an API it distrusts leave the memory; which API a batch came from survives a
    checkpoint (batch files and index) and the state dict handed to other processes."""
    mem = TaskMemory(3, image_size=32)
    mem.add(class_images(1, 4), torch.full((4,), 1), owner="demo/conv4/0")
    mem.add(torch.cat([class_images(1, 2, batch=1), class_images(2, 2, batch=1)]),
            torch.tensor([1, 1, 2, 2]), owner="demo/conv4/5")
    mem.add(class_images(2, 3, batch=2), torch.full((3,), 2))        # no owner given
    assert mem.owned_by("demo/conv4/5") == [1] and mem.owner(0) == "demo/conv4/0" and mem.owner(2) is None
    folder = str(tmp_path / "memory")
    again = TaskMemory(3, 32)
    again.load(mem.save(folder, preview=0), folder)
    assert again.owned_by("demo/conv4/5") == [1] and again.owner(0) == "demo/conv4/0"
    other = TaskMemory(3, 32)
    other.load_state_dict(mem.state_dict())
    assert len(other.owned_by("demo/conv4/5")) == 2          # one batch per class in a state dict
    assert mem.drop_owner("demo/conv4/5") == 4
    assert mem.count(1) == 4 and mem.count(2) == 3 and not mem.owned_by("demo/conv4/5")
    assert tags(torch.cat(mem.batches(1)).float() / 255)[1].eq(0).all()     # API 0's batch is what is left
    assert mem.drop_owner("demo/conv4/0") == 4 and mem.classes == [2]
    TaskMemory.prune(folder, mem.save(folder, preview=0))
    assert sorted(os.listdir(folder)) == [batch_file(2)]
