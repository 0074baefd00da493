"""Datasets: specs, prepared splits, episodic sampling, the demo data, batched augmentation."""
from .specs import SPECS, SPLITS, DatasetSpec, get_spec, MIX_DATASETS, MIX_NUM_CLASSES, MIX_IMAGE_SIZE
from .split import DataError, SplitData, load_split, train_val_indices, split_csv_path
from .sampler import Task, sample_task, fixed_tasks, task_rng, check_episode
from .augment import normalize, random_crop_flip, resize
