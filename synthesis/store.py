"""The API store: where API files live, what they hold, and how a file becomes a network.

    <prefix>/<dataset>/<arch>/meta_train/<way>way/model/model_specific_<i>.pth    (the original's layout)
    <that folder>/pool.json                                                          (pretrain.py's summary)

A file written by pretrain.py is a dict of plain data:
    state_dict, dataset, arch, way, classes, image_size, channels, epochs, val_acc, index, seed, ...
Everything else in the project (pretraining, the pool, bench, reporting, tests) goes through
this module to find, write, describe and load API files. Files are loaded as plain data
(core.io.load_checkpoint): a file from elsewhere cannot run code.
"""
from __future__ import annotations

import glob
import os
import re

from core.errors import CheckpointError, PoolError
from core.io import atomic_torch_save, load_checkpoint

FILE_RE = re.compile(r"model_specific_(\d+)\.pth")


def pool_dir(prefix: str, dataset: str, arch: str, way: int) -> str:
    """<prefix>/<dataset>/<arch>/meta_train/<way>way/model."""
    return os.path.join(prefix, dataset, arch, "meta_train", f"{way}way", "model")


def api_path(folder: str, index: int) -> str:
    return os.path.join(folder, f"model_specific_{index}.pth")


def api_files(folder: str) -> dict[int, str]:
    """{index: path} of the model_specific_<index>.pth files in a pool folder, by index."""
    found = {}
    for p in glob.glob(os.path.join(folder, "model_specific_*.pth")):
        m = FILE_RE.fullmatch(os.path.basename(p))
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def pretrain_command(prefix: str, dataset: str, arch: str, way: int, api_num: int) -> str:
    """The command that makes a missing pool (quoted in error messages)."""
    return (f"python pretrain.py --dataset {dataset} --pre_backbone {arch} --pretrained_path_prefix {prefix} "
            f"--way_pretrain {way} --APInum {api_num}")


def write_api(ckpt: dict, path: str) -> None:
    """Write one API file atomically (a crash never leaves a partial file)."""
    atomic_torch_save(ckpt, path)


def _read(path: str, mmap: bool) -> dict:
    try:
        return load_checkpoint(path, what="API checkpoint", mmap=mmap,
                               hint="delete it and rerun pretrain.py to retrain it")
    except CheckpointError as e:
        raise PoolError(str(e)) from None


def read_meta(path: str, expect: dict | None = None) -> dict:
    """Everything in an API file but the weights (memory-mapped: the weights are not read).

    `expect` ({"dataset": .., "arch": .., "way": ..}) must match the file, else one PoolError line."""
    meta = _read(path, mmap=True)
    meta.pop("state_dict", None)
    check_identity(path, meta, expect)
    return meta


def check_identity(path: str, meta: dict, expect: dict | None) -> None:
    for k, want in (expect or {}).items():
        if meta.get(k) != want:
            raise PoolError(f"{path} holds {k} {meta.get(k)!r}, expected {want!r}: the file belongs to another "
                            "pool; pass the right --pretrained_path_prefix or retrain it with pretrain.py")


def load_model(path: str, expect: dict | None = None):
    """(the API's network in eval mode on the CPU, its metadata) from one API file."""
    import network
    from dataset.specs import get_spec
    ckpt = _read(path, mmap=False)
    state = ckpt.pop("state_dict")
    check_identity(path, ckpt, expect)
    spec = get_spec(ckpt["dataset"])
    model = network.build(ckpt["arch"], ckpt["way"], channels=ckpt.get("channels", spec.channels),
                          image_size=ckpt.get("image_size", spec.image_size))
    model.load_state_dict(state)
    return model.eval(), ckpt
