"""The pool of black-box APIs and the three scenarios' draw rules.

    API-SS  --dataset D   --pre_backbone A    a random API of D/A
    API-SH  --dataset D   --pre_backbone mix  a random arch among conv4/resnet10/resnet18, then an API
    API-MH  --dataset mix --pre_backbone mix  a random dataset among cifar100/miniimagenet/cub, a random
                                              arch, then an API; its classes are moved into the shared
                                              228-class space (cifar 0-63, mini 64-127, cub 128-227)

Pools are read lazily: opening a pool reads only each file's metadata (memory-mapped, the
weights stay on disk); an API's weights are loaded when it is drawn and a few recently drawn
APIs are kept ready (an LRU cache), so pools of hundreds of APIs never sit in memory at once.
Query counts live in one shared meter, so they survive eviction and the budget spans the pool.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import FlagError, PoolError
from dataset.specs import MIX_DATASETS, get_spec
from network import ARCHS       # every architecture a single-architecture pool may hold

from .api import BlackBoxAPI, QueryMeter, load_api
from .store import api_files, pool_dir, pretrain_command, read_meta

MIX_ARCHS = ("conv4", "resnet10", "resnet18")   # what API-SH / API-MH draw among (the paper's)


@dataclass(frozen=True)
class APIEntry:
    """What the pool knows about an API without loading its weights."""
    dataset: str
    arch: str
    index: int
    path: str
    classes: tuple[int, ...]    # absolute ids in the run's label space (MH: offset added)
    val_acc: float | None

    @property
    def name(self) -> str:
        """How runs and deceptive pools' truth files name the API: <dataset>/<arch>/<index>."""
        return f"{self.dataset}/{self.arch}/{self.index}"


def _read_entry(path: str, dataset: str, arch: str, way: int, index: int, offset: int) -> APIEntry:
    meta = read_meta(path, expect={"dataset": dataset, "arch": arch, "way": way})
    return APIEntry(dataset, arch, index, path, tuple(int(c) + offset for c in meta["classes"]),
                    meta.get("val_acc"))


class APIPool:
    """Draws APIs by the scenario's rules. Build with APIPool.load(...)."""

    def __init__(self, groups: dict[tuple[str, str], list[APIEntry]], device, *, mix: bool,
                 white_box: bool = False, budget: int | None = None, cache_size: int = 8, output: str = "probs",
                 compile: bool = False):
        self.groups = groups
        self.datasets = sorted({d for d, _ in groups}, key=lambda d: (d not in MIX_DATASETS, d))
        self.archs = sorted({a for _, a in groups}, key=ARCHS.index)
        self.mix = mix
        self.device = torch.device(device)
        self.white_box = white_box
        self.output = output
        self.compile = compile
        self.meter = QueryMeter(budget=budget)
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[tuple[str, str, int], BlackBoxAPI] = OrderedDict()

    # -- opening
    @classmethod
    def load(cls, prefix: str, dataset: str, arch: str, way: int, api_num: int, device,
             white_box: bool = False, budget: int | None = None, *, cache_size: int = 8, output: str = "probs",
             compile: bool = False, say=None) -> "APIPool":
        """Open the pool(s) a scenario needs. dataset 'mix' (API-MH) implies every arch is mixed too.

        Uses the first `api_num` APIs (by index) of each dataset/arch folder; when a folder holds fewer,
        uses those and says so once. A missing folder is one error naming the pretrain.py command.
        """
        say = say or (lambda m: print(m, file=sys.stderr))
        mix = dataset == "mix"
        datasets = list(MIX_DATASETS) if mix else [dataset]
        archs = list(MIX_ARCHS) if (arch == "mix" or mix) else [arch]
        if api_num < 1:
            raise FlagError(f"--APInum must be at least 1, got {api_num}")
        groups, missing = {}, []
        for d in datasets:
            spec = get_spec(d)
            offset = spec.label_offset if mix else 0
            for a in archs:
                if a not in ARCHS:
                    raise FlagError(f"unknown pre_backbone {a!r}; choose one of "
                                     f"{', '.join(ARCHS)} or mix")
                folder = pool_dir(prefix, d, a, way)
                files = api_files(folder)
                if not files:
                    missing.append((folder, pretrain_command(prefix, d, a, way, api_num)))
                    continue
                use = list(files.items())[:api_num]
                if len(use) < api_num:
                    say(f"note: --APInum {api_num} but {folder} holds {len(use)} API(s); using those {len(use)}")
                groups[(d, a)] = [_read_entry(p, d, a, way, i, offset) for i, p in use]
        if missing:
            where = " and ".join(f for f, _ in missing)
            how = "; then ".join(f"`{c}`" for _, c in missing)
            raise PoolError(f"no pretrained APIs in {where}; make them with {how} "
                            "(or pass the right --pretrained_path_prefix)")
        return cls(groups, device, mix=mix, white_box=white_box, budget=budget, cache_size=cache_size, output=output,
                   compile=compile)

    # -- what is in it
    @property
    def apis(self) -> list[APIEntry]:
        """Every API of the pool (metadata only; draw() or get() gives a queryable API)."""
        return [e for g in self.groups.values() for e in g]

    @property
    def classes(self) -> list[int]:
        """Sorted absolute class ids the pool covers."""
        return sorted({c for e in self.apis for c in e.classes})

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    @property
    def queries(self) -> int:
        """Images queried across all APIs of the pool."""
        return self.meter.total

    # -- drawing
    def draw(self, rng: np.random.Generator) -> BlackBoxAPI:
        """A random API, opened (pick, then open)."""
        return self.open(self.pick(rng))

    def pick(self, rng: np.random.Generator) -> APIEntry:
        """A random API's entry, nothing loaded: SS one group; SH a random arch first; MH a random
        dataset, then arch. A meta-batch is planned with these before any API is opened."""
        d = self.datasets[int(rng.integers(len(self.datasets)))]
        archs = [a for a in self.archs if (d, a) in self.groups]
        a = archs[int(rng.integers(len(archs)))]
        entries = self.groups[(d, a)]
        return entries[int(rng.integers(len(entries)))]

    def get(self, dataset: str, arch: str, index: int) -> BlackBoxAPI:
        """The API model_specific_<index> of one dataset/arch folder."""
        for e in self.groups.get((dataset, arch), []):
            if e.index == index:
                return self.open(e)
        have = [e.index for e in self.groups.get((dataset, arch), [])]
        raise PoolError(f"no API {index} for {dataset}/{arch} in this pool (indices {have[:5]}"
                         f"{'...' if len(have) > 5 else ''})")

    def open(self, e: APIEntry) -> BlackBoxAPI:
        """The queryable API of an entry (loaded now, or kept ready from an earlier draw)."""
        key = (e.dataset, e.arch, e.index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        spec_offset = get_spec(e.dataset).label_offset if self.mix else 0
        api = load_api(e.path, self.device, label_offset=spec_offset, white_box=self.white_box, output=self.output,
                       expect={"dataset": e.dataset, "arch": e.arch},
                       meter=self.meter, compile=self.compile)
        self._cache[key] = api
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return api

    @property
    def ready(self) -> list[tuple[str, str, int]]:
        """The APIs held open, least recently used first."""
        return list(self._cache)

    def add_queries(self, per_api: dict[str, int]) -> None:
        """Count queries another process of the run made ({API key: queries}), so that every process
        holds the run's total (the budget spans them all)."""
        for key, n in per_api.items():
            self.meter.count(key, int(n))

    # -- resume
    def state_dict(self) -> dict:
        return {"total": self.meter.total, "per_api": dict(self.meter.per_api)}

    def load_state_dict(self, state: dict) -> None:
        self.meter.total = int(state["total"])
        self.meter.per_api = dict(state["per_api"])
