"""The black-box boundary: an API is something you can query, nothing more.

`BlackBoxAPI` turns a pretrained classifier into a function normalized images -> class
scores: probabilities (what a black-box service answers) or logits (what the original's API answers,
its network itself; `output`). In black-box mode the forward runs without autograd, so no gradient can ever
reach the weights or flow back to the caller; every queried image is counted, and an optional
budget stops the run with one clear line. The model itself lives only inside a closure: the
object has no `.model`, no `.parameters()`, no `state_dict()`. How that closure computes the
network fast is accel's business (accel.api_forward: the same function, faster).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import accel
from core.errors import QueryBudgetExceeded
from dataset.specs import DatasetSpec


@dataclass
class QueryMeter:
    """Queries counted across the APIs of a pool (per API key and in total) and the shared budget."""
    budget: int | None = None
    total: int = 0
    per_api: dict[str, int] = field(default_factory=dict)

    # the zero-order estimate's lanes (synthesis/zo.py) query from two threads at once
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def charge(self, key: str, n: int) -> None:
        """Count n queries to API `key`; refused, counting nothing, if they would exceed the budget."""
        with self.lock:
            if self.budget is not None and self.total + n > self.budget:
                raise QueryBudgetExceeded(
                    f"API query budget of {self.budget} images exceeded ({self.total} spent, this call asks "
                    f"{n} more); raise the budget or lower generate_iterations/q")
            self.count(key, n)

    def count(self, key: str, n: int) -> None:
        """Count n queries already made (by this process, or another process of the run)."""
        with self.lock:
            self.total += n
            self.per_api[key] = self.per_api.get(key, 0) + n




# ----------------------------------------------------------------------------- the wrapper

OUTPUTS = ("probs", "logits")


class BlackBoxAPI:
    """A pretrained classifier seen as a black box: normalized images [B, C, S, S] -> scores [B, way],
    class probabilities (output "probs") or the logits they are the softmax of (output "logits").

    classes: absolute class id of each output (in the run's label space; API-MH adds the dataset's
        label_offset). spec: the API's dataset (image size, channels, mean/std for `dataset.normalize`).
    queries: images queried through this API. budget: the query budget of its meter (None: no limit).
    white_box=True (ablation without --ZO only): the returned scores are differentiable with respect to
    the input images; the weights stay frozen and hidden either way.
    speed: options of accel.api_forward (benchmarks compare its fast and plain forms); none: the fast one.
    """

    def __init__(self, model: nn.Module, classes, spec: DatasetSpec, arch: str, *, device="cpu",
                 white_box: bool = False, budget: int | None = None, meter: QueryMeter | None = None,
                 key: str | None = None, speed: dict | None = None, output: str = "probs"):
        if output not in OUTPUTS:
            raise ValueError(f"an API answers {' or '.join(OUTPUTS)}, not {output!r}")
        self.classes = [int(c) for c in classes]
        self.output = output
        self.spec = spec
        self.arch = arch
        self.device = torch.device(device)
        self.white_box = white_box
        self.key = key or f"{spec.name}/{arch}/{id(self)}"
        self._meter = meter if meter is not None else QueryMeter(budget=budget)
        self.timing = False             # benchmarks: accumulate the forward's wall time (syncs CUDA)
        self.forward_seconds = 0.0
        example = torch.randn(4, spec.channels, spec.image_size, spec.image_size,
                              generator=torch.Generator().manual_seed(0))
        # The only reference to the network is this closure's cell: nothing public leads to a weight.
        self.__logits = accel.api_forward(model, self.device, grad=white_box, example=example, **(speed or {}))

    @property
    def way(self) -> int:
        return len(self.classes)

    @property
    def queries(self) -> int:
        return self._meter.per_api.get(self.key, 0)

    @property
    def budget(self) -> int | None:
        return self._meter.budget

    def _check(self, x: torch.Tensor) -> None:
        s, c = self.spec.image_size, self.spec.channels
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"API of {self.spec.name} takes normalized images [B, {c}, {s}, {s}], "
                             f"got {tuple(x.shape)}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The scores of each image: p(y | x), the softmax of the hidden model's logits, or those logits
        (output). Counts x.shape[0] queries."""
        self._check(x)
        self._meter.charge(self.key, x.shape[0])
        x = x.to(self.device)
        t0 = time.perf_counter() if self.timing else 0.0
        answer = (lambda z: z) if self.output == "logits" else (lambda z: F.softmax(z, dim=1))
        if self.white_box:
            probs = answer(self.__logits(x))
        else:
            with torch.inference_mode():
                probs = answer(self.__logits(x.detach()))
            probs = probs.clone()   # a normal tensor again (inference tensors cannot join autograd later)
        if self.timing:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            with self._meter.lock:
                self.forward_seconds += time.perf_counter() - t0
        return probs

    def __repr__(self) -> str:
        mode = "white-box" if self.white_box else "black-box"
        return (f"BlackBoxAPI({self.key}, {mode}, classes={self.classes}, queries={self.queries}"
                + (f", budget={self.budget}" if self.budget is not None else "") + ")")


def load_api(path: str, device="cpu", *, label_offset: int = 0, white_box: bool = False, output: str = "probs",
             meter: QueryMeter | None = None, budget: int | None = None, compile: bool = False,
             expect: dict | None = None) -> BlackBoxAPI:
    """Open one API file (synthesis.store) as a black box.

    label_offset is added to its class ids (API-MH). `expect` ({"arch": .., "dataset": .., "way": ..})
    must match the file, else one error line.
    """
    from dataset.specs import get_spec

    from .store import load_model
    model, meta = load_model(path, expect)      # an original-format file needs expect["dataset"]
    key = f"{meta['dataset']}/{meta['arch']}/{meta.get('index', path)}"
    return BlackBoxAPI(model, [c + label_offset for c in meta["classes"]], get_spec(meta["dataset"]), meta["arch"],
                       device=device, white_box=white_box, meter=meter, budget=budget, key=key, output=output,
                       speed={"compile": True} if compile else None)


def probabilities(api, scores: torch.Tensor) -> torch.Tensor:
    """An API's answer as class probabilities, whichever it gives."""
    return F.softmax(scores, dim=1) if getattr(api, "output", "probs") == "logits" else scores
