"""Files: the one atomic writer, JSON helpers, and safe checkpoint loading.

Every file the project writes goes through `atomic_write`: the bytes go to a temporary name
beside the target, are flushed and fsync'ed, then renamed over it, so a crash or kill -9
leaves either the old file or the new one, never a torn one.

Checkpoints are data, never code: `load_checkpoint` unpickles with torch's weights-only
loader, which accepts tensors and plain containers only, so a file from elsewhere cannot run
anything when it is read.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from .errors import CheckpointError


def atomic_write(path: str, write: Callable, binary: bool = True) -> None:
    """write(f) into a temporary file beside `path`, fsync it, then rename it over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path: str) -> None:
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(obj, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), binary=False)


def atomic_text(text: str, path: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def load_checkpoint(path: str, *, what: str = "checkpoint", hint: str = "", mmap: bool = False) -> dict:
    """The dict stored in `path`, loaded as plain data (tensors, numbers, strings, containers).

    A file that cannot be read, or whose pickle asks for anything else (objects, functions),
    raises CheckpointError naming the file; nothing in it runs."""
    import pickle
    import warnings

    import torch
    try:
        with warnings.catch_warnings():     # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        why = [li.strip() for li in str(e).splitlines() if li.strip().startswith(("Unsupported", "Trying to"))]
        raise CheckpointError(f"{path} is not a plain-data {what}: its pickle asks for more than tensors and "
                              f"plain values ({why[0][:100] if why else 'refused by the weights-only loader'}), "
                              f"so it was not loaded{'; ' + hint if hint else ''}") from None
    except Exception as e:      # noqa: BLE001 - truncated, not a torch file, missing: one line either way
        first = str(e).strip().splitlines()[0].split(". ")[0][:100] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read the {what} {path} ({first}: truncated or not a torch file?)"
                              f"{'; ' + hint if hint else ''}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a {what}{'; ' + hint if hint else ''}")
    return obj
