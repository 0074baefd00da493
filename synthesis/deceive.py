"""Deceptive API pools on demand, for robustness experiments (docs/robustness.md).

    python -m synthesis.deceive --pretrained_path_prefix runs/pool --dataset demo --pre_backbone conv4 \
        --APInum 20 --fraction 0.4 --out runs/pool_deceptive_40

copies the pool the flags name (every folder of the scenario: API-SH/MH pools too) to --out and turns
round(fraction x APIs) of them, drawn at random, into deceptive APIs, the --kinds in turn. A deceptive
API keeps its metadata (the classes it claims, the validation accuracy it reports); only its network
changes:

    labels      the trained network of another API of the pool, the one sharing fewest classes with it:
                its answers name classes it was never trained on
    untrained   freshly initialised weights behind the claimed accuracy
    uniform     its own network with the classifier's weights and bias scaled by 0.01: near-uniform answers

Which API is which goes to <out>/deception_truth.json, beside the pool folders, for evaluation only:
meta-training never reads it (a test checks this).
"""
from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import torch

from core.errors import FlagError, PoolError
from core.io import atomic_json, load_checkpoint

from .pool import APIPool
from .store import write_api

KINDS = ("labels", "untrained", "uniform")
TRUTH_FILE = "deception_truth.json"
UNIFORM_SCALE = 0.01


def _classifier_keys(state: dict) -> tuple[str, str]:
    """The last linear layer of a classifier's state dict: (weight key, bias key)."""
    w = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1]
    return w, w[: -len("weight")] + "bias"


def deceptive_state(kind: str, ckpt: dict, donor: dict | None, seed: int) -> dict:
    """The network a deceptive API of `kind` answers with, as a state dict."""
    if kind == "labels":
        return {k: v.clone() for k, v in donor["state_dict"].items()}
    if kind == "untrained":
        import network
        torch.manual_seed(seed)
        net = network.build(ckpt["arch"], ckpt["way"], channels=ckpt.get("channels", 3),
                            image_size=ckpt["image_size"], stem_relu=ckpt.get("stem_relu", True),
                            init=ckpt.get("init", "torch"))
        return net.state_dict()
    if kind == "uniform":
        state = {k: v.clone() for k, v in ckpt["state_dict"].items()}
        for k in _classifier_keys(state):
            state[k] *= UNIFORM_SCALE
        return state
    raise ValueError(f"unknown deception kind {kind!r}; choose among {', '.join(KINDS)}")


def make_deceptive_pool(prefix: str, dataset: str, arch: str, way: int, api_num: int, fraction: float, out: str,
                        kinds=KINDS, seed: int = 0) -> dict:
    """Copy the pool to `out`, make round(fraction x n) of its APIs deceptive; returns the truth record."""
    if not 0 <= fraction <= 1:
        raise FlagError(f"--fraction is the share of deceptive APIs, in [0, 1]; got {fraction}")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise FlagError(f"unknown deception kinds {bad}; choose among {', '.join(KINDS)}")
    if os.path.exists(os.path.join(out, TRUTH_FILE)):
        raise FlagError(f"{out} already holds a deceptive pool ({TRUTH_FILE}); choose another --out or delete it")
    if os.path.abspath(out) == os.path.abspath(prefix):
        raise FlagError("--out must differ from --pretrained_path_prefix: the clean pool is kept as it is")
    pool = APIPool.load(prefix, dataset, arch, way, api_num, "cpu", say=lambda m: None)
    entries = pool.apis
    rng = np.random.default_rng(seed)
    n_bad = int(round(fraction * len(entries)))
    # a prefix of one permutation: with the same seed, a smaller fraction's deceptive APIs are a larger one's
    order = rng.permutation(len(entries))[:n_bad].tolist()
    kind_of = {i: kinds[j % len(kinds)] for j, i in enumerate(order)}
    records = []
    for i, e in enumerate(entries):
        dest = os.path.join(out, os.path.relpath(e.path, prefix))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        kind = kind_of.get(i, "honest")
        rec = {"api": e.name, "dataset": e.dataset, "arch": e.arch, "index": e.index, "kind": kind,
               "classes": list(e.classes), "claimed_val_acc": e.val_acc}
        if kind == "honest":
            shutil.copyfile(e.path, dest)
        else:
            ckpt = load_checkpoint(e.path, what="API checkpoint")
            if "state_dict" not in ckpt:
                raise PoolError(f"{e.path} is an API file of the original implementation; deceptive pools are made "
                                "from pools written by pretrain.py")
            donor = None
            if kind == "labels":
                same = [o for o in entries if o is not e and (o.dataset, o.arch) == (e.dataset, e.arch)]
                if not same:
                    raise FlagError(f"a labels-deceptive API needs another API of {e.dataset}/{e.arch} to take "
                                    "the network of; the pool holds one")
                overlap = [len(set(o.classes) & set(e.classes)) for o in same]
                best = [o for o, k in zip(same, overlap) if k == min(overlap)]
                d = best[i % len(best)]
                donor = load_checkpoint(d.path, what="API checkpoint")
                rec.update(donor=d.name, answers_for=list(d.classes))
            ckpt["state_dict"] = deceptive_state(kind, ckpt, donor, seed * 100_003 + i)
            write_api(ckpt, dest)
        records.append(rec)
    for folder in {os.path.dirname(e.path) for e in entries}:      # pool.json: the claims, unchanged
        summary = os.path.join(folder, "pool.json")
        if os.path.isfile(summary):
            shutil.copyfile(summary, os.path.join(out, os.path.relpath(summary, prefix)))
    truth = {"source": os.path.abspath(prefix), "fraction": fraction, "kinds": list(kinds), "seed": seed,
             "deceptive": n_bad, "apis": records}
    atomic_json(truth, os.path.join(out, TRUTH_FILE))
    return truth


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m synthesis.deceive", description=__doc__.split("\n")[0])
    p.add_argument("--pretrained_path_prefix", required=True, help="root of the clean pool(s)")
    p.add_argument("--dataset", default="demo", help="as main.py's (mix: API-MH)")
    p.add_argument("--pre_backbone", default="conv4", help="as main.py's (mix: API-SH)")
    p.add_argument("--way_pretrain", type=int, default=5)
    p.add_argument("--APInum", type=int, default=100, help="APIs per dataset/arch folder, as main.py's")
    p.add_argument("--fraction", type=float, required=True, help="share of the pool's APIs made deceptive")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, taken in turn: {', '.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0, help="which APIs are made deceptive, and the untrained weights")
    p.add_argument("--out", required=True, help="root of the deceptive copy")
    a = p.parse_args(argv)
    truth = make_deceptive_pool(a.pretrained_path_prefix, a.dataset, a.pre_backbone, a.way_pretrain, a.APInum,
                                a.fraction, a.out, [k.strip() for k in a.kinds.split(",") if k.strip()], a.seed)
    for r in truth["apis"]:
        if r["kind"] != "honest":
            print(f"{r['api']:>24}  {r['kind']}" + (f" (answers with {r['donor']}'s network)" if "donor" in r else ""))
    print(f"{truth['deceptive']} of {len(truth['apis'])} APIs deceptive; pool in {a.out}, "
          f"truth in {os.path.join(a.out, TRUTH_FILE)} (for evaluation only)")
    return truth


if __name__ == "__main__":
    from core import cli
    cli.run(main)
