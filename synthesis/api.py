"""The black-box boundary: an API is something you can query, nothing more.

`BlackBoxAPI` turns a pretrained classifier into a function normalized images -> class
probabilities. In black-box mode the forward runs without autograd, so no gradient can ever
reach the weights or flow back to the caller; every queried image is counted, and an optional
budget stops the run with one clear line. The model itself lives only inside a closure: the
object has no `.model`, no `.parameters()`, no `state_dict()`.

Because the zero-order estimator spends (q + 1) queries per image per step, the simulated API's
forward is the hot path. `inference_forward` prepares a frozen copy of the model that computes
the same function faster: batch-norm folded into the preceding convolutions (eval statistics),
max-pooling moved before the ReLU it follows (exact), and on the CPU oneDNN tensors end to end
(channels-last dense tensors where an op has no oneDNN kernel) in micro-batches of 128 images;
torch.compile optionally (not faster on the 2-core CPU, bench/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import copy
import io
import operator
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import QueryBudgetExceeded
from dataset.specs import DatasetSpec

# Images per forward call on the CPU: small calls keep the activations in cache (bench/RESULTS.md).
CPU_MICRO_BATCH = 128


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
                    f"{n} more); raise the budget or lower --generate_iterations/--q")
            self.count(key, n)

    def count(self, key: str, n: int) -> None:
        """Count n queries already made (by this process, or another process of the run)."""
        with self.lock:
            self.total += n
            self.per_api[key] = self.per_api.get(key, 0) + n


# ----------------------------------------------------------------------------- fast inference

def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with every BatchNorm that directly follows a convolution folded
    into that convolution's weight and bias: W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta.

    Traces with torch.fx (handles Sequential, ResNet blocks, any graph); falls back to folding
    Conv2d -> BatchNorm2d pairs inside nn.Sequential containers when tracing fails.
    """
    model = copy.deepcopy(model).eval()
    try:
        from torch.fx.experimental.optimization import fuse
        return pool_before_relu(fuse(model, inplace=True))
    except Exception:   # noqa: BLE001 - untraceable model: fold what the containers show
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        for mod in model.modules():
            if isinstance(mod, nn.Sequential):
                for i in range(len(mod) - 1):
                    if isinstance(mod[i], nn.Conv2d) and isinstance(mod[i + 1], nn.BatchNorm2d) \
                            and mod[i + 1].track_running_stats:
                        mod[i] = fuse_conv_bn_eval(mod[i], mod[i + 1])
                        mod[i + 1] = nn.Identity()
        return model


def pool_before_relu(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite ReLU -> MaxPool2d as MaxPool2d -> ReLU: exact (max commutes with the monotone ReLU),
    and the ReLU then touches a quarter of the values."""
    mods = dict(gm.named_modules())
    changed = False
    for relu in list(gm.graph.nodes):
        if relu.op != "call_module" or not isinstance(mods.get(relu.target), nn.ReLU) or len(relu.users) != 1:
            continue
        pool = next(iter(relu.users))
        if pool.op != "call_module" or not isinstance(mods.get(pool.target), nn.MaxPool2d) or pool.args[0] is not relu:
            continue
        src = relu.args[0]
        pool.replace_all_uses_with(relu)
        pool.args = (src, *pool.args[1:])
        relu.args = (pool,)
        relu.prepend(pool)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def onednn_friendly(net: nn.Module) -> bool:
    """Whether every step of a traced network has a oneDNN-tensor kernel (conv, linear, ReLU, max-pool,
    add, flatten). ResNet's global average pooling (mean over H, W) has none: it stays dense."""
    if not isinstance(net, torch.fx.GraphModule):
        return False
    mods = dict(net.named_modules())
    for node in net.graph.nodes:
        if node.op == "call_module" and not isinstance(mods[node.target], (nn.Conv2d, nn.Linear, nn.ReLU,
                                                                           nn.MaxPool2d, nn.Identity)):
            return False
        if node.op == "call_method" and node.target not in ("flatten", "relu", "relu_"):
            return False
        if node.op == "call_function" and node.target not in (torch.relu, torch.flatten, operator.add):
            return False
    return True


def onednn_chain(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The folded network as a flat sequence of oneDNN kernel calls, when its graph is a chain of
    convolutions, max-pools and ReLUs ending in flatten -> Linear (conv4); None for anything else.

    The same kernels as the network converted module by module (torch.utils.mkldnn), without the
    per-layer module dispatch (its cost: bench/RESULTS.md, "fast paths on AVX-512 and AVX2").
    The head runs dense: its input is a few values per image.
    """
    if not isinstance(net, torch.fx.GraphModule):
        return None
    mods = dict(net.named_modules())
    steps, prev, head = [], None, None
    for node in net.graph.nodes:
        if node.op == "placeholder":
            prev = node
            continue
        if node.op == "output":
            break
        if head is not None and not (node.op == "call_module" and isinstance(mods[node.target], nn.Linear)):
            return None                                 # only the head may follow the flatten
        if not node.args or node.args[0] is not prev or len(node.users) != 1:
            return None
        prev = node
        m = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            geo = (list(m.padding), list(m.stride), list(m.dilation), m.groups)
            w = torch._C._nn.mkldnn_reorder_conv2d_weight(m.weight.detach().contiguous().to_mkldnn(), *geo)
            b = (m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_channels)).to_mkldnn()
            steps.append(lambda h, w=w, b=b, geo=geo: torch.mkldnn_convolution(h, w, b, *geo))
        elif isinstance(m, nn.MaxPool2d):
            pair = torch.nn.modules.utils._pair
            k, st, pad, dil = (list(pair(v)) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation))
            steps.append(lambda h, k=k, st=st, pad=pad, dil=dil, c=m.ceil_mode: torch.mkldnn_max_pool2d(h, k, st, pad,
                                                                                                       dil, c))
        elif isinstance(m, nn.ReLU) or (node.op == "call_method" and node.target in ("relu", "relu_")) \
                or (node.op == "call_function" and node.target is torch.relu):
            steps.append(torch.relu_)
        elif isinstance(m, nn.Identity):
            pass
        elif (node.op == "call_method" and node.target == "flatten"
              or node.op == "call_function" and node.target is torch.flatten) and head is None:
            if tuple(node.args[1:]) != (1,) or node.kwargs:
                return None
            head = False                                # the Linear comes next
        elif isinstance(m, nn.Linear) and head is False:
            head = m
        else:
            return None
    if not isinstance(head, nn.Linear) or not steps:
        return None
    weight, bias = head.weight.detach(), (head.bias.detach() if head.bias is not None else None)

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x.to_mkldnn()
        for step in steps:
            h = step(h)
        return F.linear(h.to_dense().flatten(1), weight, bias)
    return forward


def inference_forward(model: nn.Module, device, *, grad: bool = False, mkldnn: bool | None = None,
                      channels_last: bool | None = None, micro_batch: int | None = -1, compile: bool = False,
                      fold_bn: bool = True, example: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images -> logits equal (to float tolerance) to `model.eval()(images)`, made for speed.

    grad: the caller needs gradients with respect to the images (white-box API); the weights are
        frozen either way (requires_grad False), so no gradient ever accumulates into them.
    mkldnn: run the folded network on oneDNN tensors end to end (no layout changes between layers,
        pooling without index bookkeeping). Default: on a CPU with oneDNN, without grad; used only if
        the network converts and matches the dense forward on `example`, else the dense path.
    channels_last: NHWC activations for the dense path (default: on the CPU).
    micro_batch: images per internal forward (-1: CPU_MICRO_BATCH on the CPU, whole batch on CUDA;
        None: never split). Splitting a batch is exact: every image is computed on its own.
    compile: torch.compile the folded dense network (off by default: on the 2-core CPU it costs ~30 s of
        compilation and was not faster, bench/RESULTS.md); any failure falls back to eager, one warning line.
    fold_bn: False keeps the batch-norm layers (for comparisons only).
    example: a small batch of inputs, used to check the oneDNN path and to trigger compilation.
    """
    device = torch.device(device)
    net = (fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()).to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    cpu = device.type == "cpu"
    if micro_batch == -1:
        micro_batch = CPU_MICRO_BATCH if cpu else None
    if channels_last is None:
        channels_last = cpu
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fn: Callable = net

    if mkldnn is None:
        mkldnn = (cpu and not grad and not compile and example is not None and torch.backends.mkldnn.is_available()
                  and onednn_friendly(net))
    if mkldnn and cpu and not grad:
        try:    # quietly: torch.fx prints the failing line of an unsupported op before raising
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                mk_fn = onednn_chain(net)
                if mk_fn is None:       # not a chain (e.g. residual blocks): the network converted module by module
                    from torch.utils import mkldnn as mkldnn_utils
                    mk = mkldnn_utils.to_mkldnn(copy.deepcopy(net).to(memory_format=torch.contiguous_format))
                    mk_fn = lambda x: mk(x.to_mkldnn()).to_dense()     # noqa: E731
                with torch.inference_mode():
                    ex = example.to(device)
                    if torch.allclose(mk_fn(ex.contiguous()), net(_layout(ex, channels_last)), rtol=1e-4, atol=1e-5):
                        fn, channels_last = mk_fn, False
        except Exception:   # noqa: BLE001 - an op without a oneDNN kernel (e.g. ResNet's mean over H, W)
            pass
    elif compile:
        try:
            compiled = torch.compile(net)
            if example is not None:
                with torch.no_grad():
                    compiled(_layout(example.to(device), channels_last))
            fn = compiled
        except Exception as e:  # noqa: BLE001 - no compiler / unsupported backend: eager is correct too
            print(f"warning: torch.compile unavailable for the API forward ({type(e).__name__}); "
                  "running eager", file=sys.stderr)

    if fn is not net and not compile:   # oneDNN path: to_mkldnn reads any layout, no copy first
        channels_last = None

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = _layout(x, channels_last)
        if micro_batch is None or x.shape[0] <= micro_batch:
            return fn(x)
        return torch.cat([fn(c) for c in x.split(micro_batch)])
    return forward


def _layout(x: torch.Tensor, channels_last: bool | None) -> torch.Tensor:
    if channels_last is None:
        return x
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


# ----------------------------------------------------------------------------- the wrapper

class BlackBoxAPI:
    """A pretrained classifier seen as a black box: normalized images [B, C, S, S] -> probabilities [B, way].

    classes: absolute class id of each output (in the run's label space; API-MH adds the dataset's
        label_offset). spec: the API's dataset (image size, channels, mean/std for `dataset.normalize`).
    queries: images queried through this API. budget: the query budget of its meter (None: no limit).
    white_box=True (ablation without --ZO only): the returned probabilities are differentiable with
    respect to the input images; the weights stay frozen and hidden either way.
    """

    def __init__(self, model: nn.Module, classes, spec: DatasetSpec, arch: str, *, device="cpu",
                 white_box: bool = False, budget: int | None = None, meter: QueryMeter | None = None,
                 key: str | None = None, compile: bool = False, micro_batch: int | None = -1,
                 channels_last: bool | None = None, fold_bn: bool = True, mkldnn: bool | None = None):
        self.classes = [int(c) for c in classes]
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
        self.__logits = inference_forward(model, self.device, grad=white_box, mkldnn=mkldnn, compile=compile,
                                          micro_batch=micro_batch, channels_last=channels_last, fold_bn=fold_bn,
                                          example=example)

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
        """p(y | x) for each image: softmax of the hidden model's logits. Counts x.shape[0] queries."""
        self._check(x)
        self._meter.charge(self.key, x.shape[0])
        x = x.to(self.device)
        t0 = time.perf_counter() if self.timing else 0.0
        if self.white_box:
            probs = F.softmax(self.__logits(x), dim=1)
        else:
            with torch.inference_mode():
                probs = F.softmax(self.__logits(x.detach()), dim=1)
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


def load_api(path: str, device="cpu", *, label_offset: int = 0, white_box: bool = False,
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
                       device=device, white_box=white_box, meter=meter, budget=budget, key=key, compile=compile)
