"""Helpers shared by several test files (fixtures live in conftest.py). Nothing here imports bench/ or
experiments/: the suite tests the library only."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import network
from dataset.specs import DatasetSpec, get_spec

from conftest import DEVICE

DEMO = get_spec("demo")

# ------------------------------------------------------------------ networks and APIs with known weights


def random_model(arch: str = "conv4", way: int = 5, image_size: int = 32, seed: int = 0) -> nn.Module:
    """An eval-mode classifier with non-trivial batch-norm statistics and affine weights, so that folding
    them into the convolutions does real work."""
    torch.manual_seed(seed)
    m = network.build(arch, way, image_size=image_size).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.normal_(1.0, 0.2)
            mod.bias.data.normal_(0.0, 0.2)
    return m


def random_api(arch: str = "conv4", classes=range(5), device=DEVICE, seed: int = 0, **kw):
    """A BlackBoxAPI of the demo dataset's geometry around random_model (kw: BlackBoxAPI's keywords)."""
    from synthesis.api import BlackBoxAPI
    classes = list(classes)
    return BlackBoxAPI(random_model(arch, len(classes), DEMO.image_size, seed), classes, DEMO, arch,
                       device=device, **kw)


def meta_model(way: int = 5, image_size: int = 32, seed: int = 0, dtype=torch.float32, device=DEVICE) -> nn.Module:
    """A conv4 meta model (batch statistics only: a pure function of its parameters), channels-last as the
    method keeps it."""
    torch.manual_seed(seed)
    return network.build("conv4", way, image_size=image_size, batch_stats=True).to(
        device, dtype, memory_format=torch.channels_last)


def demo_prep():
    """The meta model's input for the demo dataset (methods.meta_model.MetaInput)."""
    from methods.meta_model import MetaInput
    return MetaInput(DEMO.image_size, DEMO.channels, tuple(DEMO.mean), tuple(DEMO.std))


def random_tasks(n: int, way: int, shot: int, query: int, dtype=torch.float32, seed: int = 0, size: int = 32):
    """n tasks of random images in [0, 1] (drawn on the CPU, then moved: the same images on any device)."""
    import numpy as np

    from dataset import Task
    g = torch.Generator().manual_seed(seed)
    rel = torch.arange(way)
    return [Task(torch.rand(way * shot, 3, size, size, generator=g, dtype=dtype), rel.repeat_interleave(shot),
                 torch.rand(way * query, 3, size, size, generator=g, dtype=dtype), rel.repeat_interleave(query),
                 np.arange(way)).to(DEVICE) for _ in range(n)]


def flat_grads(params) -> torch.Tensor:
    """The .grad fields of parameters as one float64 vector (zeros where None)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten() for p in params])


# ------------------------------------------------------------------ a transparent "API" for recovery tests

STD = (0.2, 0.4, 0.8)           # distinct per channel: a pixel-space perturbation is then visibly anisotropic
MEAN = (0.3, 0.5, 0.7)


def tiny_spec(size: int = 8) -> DatasetSpec:
    return DatasetSpec("tiny", "tiny", size, 3, MEAN, STD, (3, 0, 0), 0, "", 1)


class FakeAPI:
    """softmax(W n) on normalised images n; records every batch it is asked about."""

    def __init__(self, way: int = 3, size: int = 8, white_box: bool = False, seed: int = 0):
        self.spec = tiny_spec(size)
        self.classes = list(range(way))
        self.device = DEVICE
        self.white_box = white_box
        g = torch.Generator().manual_seed(seed)     # drawn on the CPU: the same weights on any device
        self.w = (torch.randn(way, 3 * size * size, generator=g) * 0.05).to(DEVICE)
        self.calls: list[torch.Tensor] = []

    def logits(self, xn: torch.Tensor) -> torch.Tensor:
        return xn.flatten(1) @ self.w.t()

    def __call__(self, xn: torch.Tensor) -> torch.Tensor:
        self.calls.append(xn.detach().clone())
        p = F.softmax(self.logits(xn), 1)
        return p if self.white_box else p.detach()

    @property
    def queries(self) -> int:
        return sum(len(c) for c in self.calls)


class CountingStudent:
    """A linear student on [0, 1] images that records the batch size of each call."""

    def __init__(self, way: int = 3, size: int = 8):
        self.theta = (torch.randn(way, 3 * size * size, generator=torch.Generator().manual_seed(1)) * 0.05).to(DEVICE)
        self.theta.requires_grad_()
        self.sizes: list[int] = []
        self.grad_enabled: list[bool] = []

    def __call__(self, x01: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x01.shape[0])
        self.grad_enabled.append(torch.is_grad_enabled())
        return x01.flatten(1) @ self.theta.t()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ------------------------------------------------------------------ main.py runs on the demo fixtures

# A tiny BiDf-MKD run: 3 APIs, q = 4, 3 generator steps, 10-way replay tasks of 1 + 2 images per class.
TINY = ["--dataset", "demo", "--APInum", "3", "--ZO", "--q", "4", "--numsplit", "2", "--generate_iterations", "3",
        "--num_sup_kd", "2", "--num_qur_kd", "3", "--inner_update_num_kd", "3", "--way_train", "10",
        "--num_sup_train", "1", "--num_qur_train", "2", "--inner_update_num", "2", "--generate_interval", "2",
        "--way_test", "5", "--num_sup_test", "1", "--num_qur_test", "3", "--episode_test", "6",
        "--test_inner_update_num", "3", "--max_batch_per_class", "4", "--advstartit", "1"]


def flags(demo_root: str, demo_pool: str, out_dir: str, *extra: str) -> list[str]:
    """main.py's flags of the tiny run on the demo fixtures, writing to out_dir."""
    return [*TINY, "--data_root", demo_root, "--pretrained_path_prefix", demo_pool, "--out_dir", out_dir, *extra]


def with_out_dir(argv: list[str], out: str) -> list[str]:
    i = argv.index("--out_dir") + 1
    return [*argv[:i], out, *argv[i + 1:]]


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def last_ck(out: str) -> dict:
    return torch.load(os.path.join(out, "last.pth"), weights_only=True)


def run_memory(out: str):
    """The task memory a run's last.pth names (read from its memory/ folder)."""
    from methods.memory import TaskMemory
    ck = last_ck(out)
    mem = TaskMemory(ck["memory"]["max_batch_per_class"], ck["memory"]["image_size"])
    mem.load_state_dict(ck["memory"], folder=os.path.join(out, "memory"))
    return mem

