"""The API store: where API files live, what they hold, and how a file becomes a network.

    <prefix>/<dataset>/<arch>/meta_train/<way>way/model/model_specific_<i>.pth    (the original's layout)
    <that folder>/pool.json                                                          (pretrain.py's summary)

Two formats load as they are, with no conversion step:
    pretrain.py's:   {state_dict, dataset, arch, way, classes, image_size, channels, epochs, init,
                      stem_relu, val_acc, index, seed, ...}
    the original's:  {'teacher': state dict under the original's layer names, 'specific': class ids};
                     what it lacks (dataset, arch) comes from the folder it sits in, and the
                     architecture its weights hold must match (network/original.py maps the names).
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


def _original_meta(path: str, ckpt: dict, expect: dict | None) -> dict:
    """The metadata of an original-format file: its classes and the architecture its weights hold;
    the dataset is the folder's (expect)."""
    from network.original import describe
    try:
        held = describe(ckpt["teacher"])
    except ValueError as e:
        raise PoolError(f"{path}: {e}") from None
    classes = [int(c) for c in ckpt["specific"]]
    meta = {"format": "original", "arch": held.arch, "way": len(classes), "classes": classes,
            "channels": held.channels, "dataset": (expect or {}).get("dataset")}
    want = (expect or {}).get("arch")
    if want is not None and held.arch != want:
        raise PoolError(f"{path} is an API file of the original implementation holding a {held.arch}, not a "
                        f"{want}: pass pre_backbone {held.arch}, or move the file to the {held.arch} pool folder")
    return meta


def read_meta(path: str, expect: dict | None = None) -> dict:
    """Everything in an API file but the weights (memory-mapped: the weights are not read).

    `expect` ({"dataset": .., "arch": .., "way": ..}) must match the file, else one PoolError line."""
    from network.original import is_original_checkpoint
    ckpt = _read(path, mmap=True)
    meta = _original_meta(path, ckpt, expect) if is_original_checkpoint(ckpt) else ckpt
    meta.pop("state_dict", None)
    check_identity(path, meta, expect)
    return meta


def check_identity(path: str, meta: dict, expect: dict | None) -> None:
    for k, want in (expect or {}).items():
        if meta.get(k) != want:
            raise PoolError(f"{path} holds {k} {meta.get(k)!r}, expected {want!r}: the file belongs to another "
                            "pool; pass the right --pretrained_path_prefix or retrain it with pretrain.py")


def load_model(path: str, expect: dict | None = None):
    """(the API's network in eval mode on the CPU, its metadata) from one API file of either format.
    An original-format file needs expect["dataset"] (the pool folder's dataset)."""
    import network
    from dataset.specs import get_spec
    from network.original import build_original, is_original_checkpoint
    ckpt = _read(path, mmap=False)
    if is_original_checkpoint(ckpt):
        meta = _original_meta(path, ckpt, expect)
        check_identity(path, meta, expect)
        spec = get_spec(meta["dataset"])
        try:
            model, _ = build_original(ckpt, meta["arch"], way=meta["way"], channels=spec.channels,
                                      image_size=spec.image_size)
        except ValueError as e:
            raise PoolError(f"{path} (an API file of the original implementation): {e}") from None
        return model, {**meta, "image_size": spec.image_size}
    state = ckpt.pop("state_dict")
    check_identity(path, ckpt, expect)
    spec = get_spec(ckpt["dataset"])
    # Files from before the stem option were ResNets with a ReLU after the stem (the original has none).
    model = network.build(ckpt["arch"], ckpt["way"], channels=ckpt.get("channels", spec.channels),
                          image_size=ckpt.get("image_size", spec.image_size), stem_relu=ckpt.get("stem_relu", True),
                          init="torch")
    model.load_state_dict(state)
    return model.eval(), ckpt
