"""Checkpoints written by the original BiDf-MKD code, read into this project's networks.

The original's API files are `{'teacher': state_dict, 'specific': [class ids]}`; its networks keep
every layer in one `trunk` Sequential, so their parameter names differ from ours:

    Conv4     trunk.i.C / trunk.i.BN (i < 4)        -> features.i.0 / features.i.1
              trunk.i.trunk.0 / trunk.i.trunk.1     aliases of C / BN (same tensors), dropped
              trunk.5 (flatten head), trunk.6 (global max-pool head) -> head
    ResNet    trunk.0 / trunk.1 (stem conv / BN)    -> stem.0 / stem.1
              trunk.(2+j).C1, BN1, C2, BN2, C3, BN3 -> layers.j.conv1, bn1, conv2, bn2, conv3, bn3
              trunk.(2+j).shortcut / BNshortcut     -> layers.j.shortcut.0 / shortcut.1
              trunk.(2+B+2) (B blocks; after pool and flatten) -> head

Every function here is pure (state dicts in, state dicts out) except `build_original`, which
builds the network with `network.build` and loads the weights with strict=True.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .resnet import BASIC_WIDTHS, BOTTLENECK_WIDTHS, LAYOUTS

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
CONV4_HIDDEN = 32       # the original's Conv4 width (fixed there)


@dataclass(frozen=True)
class Held:
    """What a state dict holds. pool and feature_side are for conv4 only: the flatten head sees a
    hidden x feature_side x feature_side map, i.e. inputs of 16 * feature_side to 16 * feature_side + 15
    pixels; pool is None where the naming cannot tell (our conv4 with a hidden-wide head)."""
    arch: str
    num_classes: int
    channels: int
    naming: str                     # 'original' | 'project'
    pool: str | None = None
    feature_side: int | None = None

    def image_sizes(self) -> range | None:
        """The input sizes a conv4 flatten head accepts (None: any size, or not a conv4)."""
        if self.arch != "conv4" or self.pool != "flatten":
            return None
        return range(16 * self.feature_side, 16 * self.feature_side + 16)


# ----------------------------------------------------------------------------- recognising

def is_original_checkpoint(obj) -> bool:
    """True for the original's API file: a dict {'teacher': state dict with `trunk.` names,
    'specific': class ids}."""
    if not isinstance(obj, Mapping) or "teacher" not in obj or "specific" not in obj:
        return False
    teacher = obj["teacher"]
    return (isinstance(teacher, Mapping) and len(teacher) > 0
            and all(isinstance(k, str) and k.startswith("trunk.") for k in teacher))


def naming(state: Mapping[str, torch.Tensor]) -> str:
    """'original' (the original's `trunk.` names) or 'project' (this project's names)."""
    keys = list(state)
    if keys and all(k.startswith("trunk.") for k in keys):
        return "original"
    if "features.0.0.weight" in state or "stem.0.weight" in state:
        return "project"
    first = keys[0] if keys else "nothing"
    raise ValueError(f"not a Conv4/ResNet state dict of the original or of this project (first key {first!r})")


def describe(state: Mapping[str, torch.Tensor]) -> Held:
    """The architecture, classes and input channels a state dict holds, in either naming.

    Raises ValueError when it is neither a Conv4 nor one of the ResNets of network/resnet.py.
    """
    kind = naming(state)
    if kind == "original":
        conv, head = "trunk.0.C.weight", _original_head(state)
        if conv in state:
            w, h = state[conv], state[f"{head}.weight"]
            # four blocks, then Flatten + Linear, or AdaptiveMaxPool + Flatten + Linear
            pool = {"trunk.5": "flatten", "trunk.6": "max"}.get(head)
            if pool is None:
                raise ValueError(f"unrecognised original Conv4 head {head!r} (expected trunk.5 or trunk.6)")
            return Held("conv4", h.shape[0], w.shape[1], kind, pool, _side(h.shape[1], w.shape[0], pool))
        if "trunk.0.weight" not in state:
            raise ValueError("an original state dict with neither a Conv4 (trunk.0.C) nor a ResNet stem (trunk.0)")
        counts, block = _blocks(state, "trunk.{}.C1.weight", "trunk.{}.C3.weight", "trunk.{}.C2.weight", start=2)
        return Held(_resnet_name(counts, block), state[f"{head}.weight"].shape[0],
                    state["trunk.0.weight"].shape[1], kind)
    if "head.weight" not in state:
        raise ValueError("a state dict of this project without a classifier (head.weight)")
    if "features.0.0.weight" in state:
        w, h = state["features.0.0.weight"], state["head.weight"]
        pool = "flatten" if h.shape[1] != w.shape[0] else None
        return Held("conv4", h.shape[0], w.shape[1], kind, pool,
                    _side(h.shape[1], w.shape[0], "flatten") if pool else None)
    counts, block = _blocks(state, "layers.{}.conv1.weight", "layers.{}.conv3.weight", "layers.{}.conv2.weight")
    return Held(_resnet_name(counts, block), state["head.weight"].shape[0], state["stem.0.weight"].shape[1], kind)


def _original_head(state) -> str:
    # The classifier is the only 2-D weight directly under trunk.
    heads = [k[:-len(".weight")] for k, v in state.items()
             if re.fullmatch(r"trunk\.\d+\.weight", k) and v.dim() == 2]
    if len(heads) != 1:
        raise ValueError(f"an original state dict has one linear head trunk.N, found {len(heads)}")
    return heads[0]


def _side(in_features: int, hidden: int, pool: str) -> int | None:
    if pool == "max":
        return None
    side = math.isqrt(in_features // hidden)
    if side * side * hidden != in_features or side == 0:
        raise ValueError(f"a conv4 flatten head of {in_features} inputs is not {hidden} x s x s")
    return side


def _blocks(state, first: str, third: str, last_basic: str, start: int = 0) -> tuple[tuple[int, ...], str]:
    """Blocks per stage (a stage = a run of blocks with the same output width) and the block kind."""
    n = 0
    while first.format(start + n) in state:
        n += 1
    if n == 0:
        raise ValueError("a ResNet state dict without residual blocks")
    block = "bottleneck" if third.format(start) in state else "basic"
    out = third if block == "bottleneck" else last_basic
    widths = [state[out.format(start + j)].shape[0] for j in range(n)]
    counts: list[int] = []
    for j, w in enumerate(widths):
        if j and w == widths[j - 1]:
            counts[-1] += 1
        else:
            counts.append(1)
    return tuple(counts), block


def _resnet_name(counts: tuple[int, ...], block: str) -> str:
    for name, layout in LAYOUTS.items():
        if layout == (block, counts):
            return name
    raise ValueError(f"unrecognised ResNet: {block} blocks per stage {counts} "
                     f"(known: {', '.join(f'{n} {b} {c}' for n, (b, c) in LAYOUTS.items())})")


# ----------------------------------------------------------------------------- the name tables

def _pairs(arch: str, pool: str = "flatten") -> list[tuple[str, str]]:
    """(original name, project name) of every parameter and buffer of `arch`, in module order."""
    pairs: list[tuple[str, str]] = []

    def conv(o, p, bias=False):
        pairs.append((f"{o}.weight", f"{p}.weight"))
        if bias:
            pairs.append((f"{o}.bias", f"{p}.bias"))

    def bn(o, p):
        pairs.extend((f"{o}.{s}", f"{p}.{s}") for s in _BN)

    if arch == "conv4":
        for i in range(4):
            conv(f"trunk.{i}.C", f"features.{i}.0", bias=True)
            bn(f"trunk.{i}.BN", f"features.{i}.1")
        conv(f"trunk.{5 if pool == 'flatten' else 6}", "head", bias=True)
        return pairs
    if arch not in LAYOUTS:
        raise ValueError(f"unknown architecture {arch!r}; choose conv4 or one of {', '.join(LAYOUTS)}")
    block, counts = LAYOUTS[arch]
    widths = BASIC_WIDTHS if block == "basic" else BOTTLENECK_WIDTHS
    conv("trunk.0", "stem.0")
    bn("trunk.1", "stem.1")
    j, cin = 0, 64
    for width, n in zip(widths, counts):
        for _ in range(n):
            o, p = f"trunk.{2 + j}", f"layers.{j}"
            convs = ("C1", "C2") if block == "basic" else ("C1", "C2", "C3")
            for c, name in enumerate(convs, 1):
                conv(f"{o}.{name}", f"{p}.conv{c}", bias=(block == "bottleneck" and c == 2))
                bn(f"{o}.BN{c}", f"{p}.bn{c}")
            if cin != width:
                conv(f"{o}.shortcut", f"{p}.shortcut.0")
                if block == "basic":        # the original's bottleneck shortcut has no BN
                    bn(f"{o}.BNshortcut", f"{p}.shortcut.1")
            j, cin = j + 1, width
    conv(f"trunk.{2 + j + 2}", "head", bias=True)
    return pairs


def _conv4_aliases(state_keys) -> dict[str, str]:
    """Conv4 alias name -> canonical name: the original's ConvBlock also registers C and BN inside
    its own Sequential, so each tensor is saved twice."""
    out = {}
    for k in state_keys:
        m = re.fullmatch(r"trunk\.(\d)\.trunk\.([01])\.(\w+)", k)
        if m:
            out[k] = f"trunk.{m[1]}.{'C' if m[2] == '0' else 'BN'}.{m[3]}"
    return out


def _is_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in _BN_BUFFERS


# ----------------------------------------------------------------------------- mapping

def _check_arch(held: Held, arch: str | None) -> str:
    if arch is not None and arch != held.arch:
        raise ValueError(f"the checkpoint holds a {held.arch}, not a {arch}")
    return held.arch


def to_project(state: Mapping[str, torch.Tensor], arch: str | None = None, *,
               batch_stats: bool = False) -> dict[str, torch.Tensor]:
    """The original's state dict renamed for this project's network (`network.build(arch, ...)`,
    stem_relu=False for ResNets, the conv4 pool the file holds: `describe(state).pool`).

    arch: expected architecture (None: whatever the file holds); a different one raises ValueError
    naming the held one. batch_stats=True drops the batch-norm running statistics (the meta model
    keeps none). Tensors are shared with `state`, not copied.
    """
    held = describe(state)
    if held.naming != "original":
        raise ValueError(f"the state dict already has this project's names (a {held.arch})")
    arch = _check_arch(held, arch)
    pairs = _pairs(arch, held.pool or "flatten")
    aliases = _conv4_aliases(state) if arch == "conv4" else {}
    known = {o for o, _ in pairs}
    for k in state:
        if k not in known and k not in aliases:
            raise ValueError(f"unexpected entry {k!r} in an original {arch} state dict")
    for alias, canon in aliases.items():
        if canon in state and not torch.equal(state[alias], state[canon]):
            raise ValueError(f"{alias!r} differs from {canon!r} (the same tensor in the original): corrupt file")
    alias_of = {canon: alias for alias, canon in aliases.items()}
    out = {}
    for o, p in pairs:
        if batch_stats and _is_buffer(o):
            continue
        src = o if o in state else alias_of.get(o)
        if src is not None:
            out[p] = state[src]
        elif not o.endswith("num_batches_tracked"):     # absent in files from very old PyTorch
            raise ValueError(f"the original {arch} state dict lacks {o!r}")
    return out


# ----------------------------------------------------------------------------- building

def build_original(ckpt: Mapping, arch: str | None = None, *, way: int | None = None,
                   channels: int | None = None, image_size: int | None = None,
                   batch_stats: bool = False) -> tuple[nn.Module, list[int]]:
    """The network of an original API file (as core.io.load_checkpoint reads it), weights loaded
    (strict), in eval mode; and its class ids ('specific').

    arch / way / channels / image_size: what the caller expects; any that the file contradicts
    raises ValueError naming what the file holds. image_size defaults to the smallest size a conv4
    flatten head accepts (16 * feature_side), else 32.
    """
    from . import build     # at call time: the package imports this module

    if not is_original_checkpoint(ckpt):
        raise ValueError("not an original BiDf-MKD API checkpoint ({'teacher': state dict, 'specific': ids})")
    state = ckpt["teacher"]
    held = describe(state)
    arch = _check_arch(held, arch)
    classes = [int(c) for c in ckpt["specific"]]
    if way is not None and way != held.num_classes:
        raise ValueError(f"the checkpoint holds a {held.num_classes}-way {arch}, not {way}-way")
    if len(classes) != held.num_classes:
        raise ValueError(f"the checkpoint names {len(classes)} classes for a {held.num_classes}-way head")
    if channels is not None and channels != held.channels:
        raise ValueError(f"the checkpoint holds a {arch} for {held.channels}-channel inputs, not {channels}")
    sizes = held.image_sizes()
    if image_size is not None and sizes is not None and image_size not in sizes:
        raise ValueError(f"the checkpoint holds a conv4 for {sizes.start}-{sizes.stop - 1}px inputs, "
                         f"not {image_size}px")
    if arch == "conv4" and state["trunk.0.C.weight"].shape[0] != CONV4_HIDDEN:
        raise ValueError(f"the checkpoint holds a conv4 of width {state['trunk.0.C.weight'].shape[0]}, "
                         f"not {CONV4_HIDDEN}")
    if image_size is None:
        image_size = sizes.start if sizes is not None else 32
    model = build(arch, held.num_classes, channels=held.channels, image_size=image_size,
                          batch_stats=batch_stats, pool=held.pool or "flatten", stem_relu=False,
                          init="torch")    # every tensor is overwritten below
    try:
        model.load_state_dict(to_project(state, arch, batch_stats=batch_stats), strict=True)
    except RuntimeError as e:
        raise ValueError(f"the original {arch} does not fit: {str(e).splitlines()[-1].strip()}") from None
    return model.eval(), classes
