"""The API's network as a fast frozen function: images -> logits, the same function as `model.eval()(images)`.

The zero-order estimator spends (q + 1) queries per image per generator step, so the simulated API's
forward is the hot path of data recovery. `inference_forward` prepares a frozen copy of the network that
computes the same function faster: batch-norm folded into the preceding convolutions (eval statistics);
on the CPU oneDNN tensors end to end (conv4 as a flat chain of oneDNN kernel calls; other networks
converted module by module; channels-last dense tensors where an op has no oneDNN kernel), in
micro-batches of CPU_MICRO_BATCH images; torch.compile optionally (not faster on a 2-core CPU). Every
figure behind these choices: bench/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Images per forward call on the CPU: small calls keep the activations in cache (bench/RESULTS.md).
CPU_MICRO_BATCH = 128


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode) with every BatchNorm that directly follows a convolution folded
    into that convolution's weight and bias: W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta.

    Traces with torch.fx (handles Sequential, ResNet blocks, any graph); falls back to folding
    Conv2d -> BatchNorm2d pairs inside nn.Sequential containers when tracing fails.
    """
    model = copy.deepcopy(model).eval()
    try:
        from torch.fx.experimental.optimization import fuse
        return fuse(model, inplace=True)
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
    mkldnn: run the folded network as a flat chain of oneDNN calls (onednn_chain: conv4; no layout changes
        between layers, pooling without index bookkeeping). Default: on a CPU with oneDNN, without grad;
        used only if the network is such a chain and matches the dense forward on `example`, else the
        dense path (the ResNets: their global mean has no oneDNN kernel).
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
        mkldnn = cpu and not grad and not compile and example is not None and torch.backends.mkldnn.is_available()
    if mkldnn and cpu and not grad:
        try:    # quietly: torch.fx prints the failing line of an unsupported op before raising
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                mk_fn = onednn_chain(net)
                with torch.inference_mode():
                    ex = example.to(device)
                    if mk_fn is not None and torch.allclose(mk_fn(ex.contiguous()), net(_layout(ex, channels_last)),
                                                            rtol=1e-4, atol=1e-5):
                        fn, channels_last = mk_fn, False
        except Exception:   # noqa: BLE001 - a kernel oneDNN lacks here: the dense path is correct too
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
