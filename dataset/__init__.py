"""Datasets: specs, prepared splits, episodic sampling, the demo data, batched augmentation.

Names are imported on first use (PEP 562), so torch-free tools such as the write_*_filelist.py
scripts (`dataset.filelist`) start without importing torch.
"""
import importlib

_HOME = {
    "SPECS": "specs", "SPLITS": "specs", "DatasetSpec": "specs", "get_spec": "specs",
    "MIX_DATASETS": "specs", "MIX_NUM_CLASSES": "specs", "MIX_IMAGE_SIZE": "specs",
    "DataError": "core.errors",
    "SplitData": "split", "load_split": "split", "train_val_indices": "split", "split_csv_path": "split",
    "Task": "sampler", "sample_task": "sampler", "fixed_tasks": "sampler", "task_rng": "sampler",
    "check_episode": "sampler",
    "normalize": "augment", "random_crop_flip": "augment", "resize": "augment",
}
_SUBMODULES = ("specs", "split", "sampler", "augment", "demo", "filelist")
__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        home = _HOME[name]
        module = importlib.import_module(home) if "." in home else importlib.import_module(f".{home}", __name__)
        value = getattr(module, name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME) | set(_SUBMODULES))
