"""Golden reference outputs of the ORIGINAL BiDf-MKD code, for tests/test_golden.py.

    ORIG_DIR=/work/orig/BiDf-MKD python -m experiments.golden --out tests/fixtures/golden

Runs the authors' own functions (an exported tree of Egg-Hu/BiDf-MKD, unmodified) in this process through
the CPU harness (../shared/original-harness, or $ORIG_HARNESS: cpu_patch maps .cuda() to the CPU and stubs
the module the original imports but does not ship) on small, fixed, seeded inputs, and saves per case the
inputs and the outputs as plain tensors and dicts (torch.load(..., weights_only=True) reads them). Nothing of
the original is copied: only the numbers it computes. This script imports none of the project's modules (the
original's packages have the same names: synthesis, methods, dataset, network), so it runs the original only.

Every random input is drawn here from a fixed seed and saved (or, for the generator's 2.2M initial weights,
regenerated from a seed by `generator_weights`, a few lines the test repeats, with a saved fingerprint).
Random draws inside the original are replaced, never relied on: its zero-order directions through a patched
`torch.normal` that returns the saved ones, its latent codes through a patched `torch.randn`, its generator
re-initialisation (`reset_model`) by loading the fixed weights, its random crop and flip by the same
torchvision transform objects with a fixed, recorded offset and flip (`get_params` and `p` set per call).
What the original computes inside a function is read from its own frame when its optimiser steps
(`torch.optim` step hooks): the zero-order estimate, the objective, the gradients and the updated weights.

Each case runs the original twice, in float32 (as the original computes) and in float64 (default dtype and
every input in float64: a sharper reference that shows how much of a float32 difference is rounding).

Cases (one .pt each; README.md in the output folder describes every field):
  zo_support   BlackBoxSynthesizer.synthesize, support set (no student), 2 zero-order generator steps
  zo_query     the same for a query set with the boundary term (student: the meta model, adv 1), 1 step
  kd           MamlKD.run_inner (10 steps) + run_outer on fixed recovered sets: outer loss, meta-gradient
  maml         Maml.run: one replay task (train, second order) and one evaluation task (test mode)
  pretrain     black_box_tool.pretrain: two Adam steps of a conv4 API, both with the gradient clipped
plus api_cifar100_conv4.pth (the original-format API used throughout, a copy of the shared pool's file) and
common.pt (the meta model's initial weights as the original initialises them, its normalisation constants).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import shutil
import sys
import tempfile
import types

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
ORIG_COMMIT = "2a08d26"
API_SRC = os.path.join(SHARED, "fixtures", "original-checkpoints", "pool", "cifar100", "conv4", "meta_train", "5way",
                       "model", "model_specific_0.pth")
API_FILE = "api_cifar100_conv4.pth"
NZ = 256
WAY = 5
META_SEED = 2022            # mainKD.py: setup_seed(2022), then the meta model is built
SAMPLE = 1024               # entries kept of a generator tensor larger than this (index saved)

# ----------------------------------------------------------------------------- shared by golden.py and the test


def generator_weights(seed: int, shapes: list[tuple[str, tuple]]) -> dict:
    """Fixed initial weights for the original's Generator (reset_model's layout: conv/linear weights spread
    like N(0, 0.02), biases 0, batch-norm weights around 1), drawn uniformly with the same std from
    torch.rand (exact bits on any CPU). tests/test_golden.py repeats this function; the saved fingerprint
    checks that both draw the same numbers."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes:
        u = torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1      # uniform in [-1, 1): std 1/sqrt(3)
        if len(shape) == 1 and name.endswith("bias"):
            out[name] = torch.zeros(shape)
        elif len(shape) == 1:                                                   # batch-norm weight
            out[name] = 1 + u * (0.02 * 3 ** 0.5)
        else:
            out[name] = u * (0.02 * 3 ** 0.5)
    return out


def fingerprint(tensors: dict) -> dict:
    """Per tensor: [float64 sum, the values at 4 fixed positions]."""
    fp = {}
    for k, t in tensors.items():
        f = t.detach().double().flatten()
        pos = torch.tensor([0, f.numel() // 3, (2 * f.numel()) // 3, f.numel() - 1])
        fp[k] = torch.cat([f.sum()[None], f[pos]])
    return fp


# ----------------------------------------------------------------------------- the original, in this process

O = types.SimpleNamespace()     # the original's modules once loaded


def load_original() -> None:
    orig = os.path.abspath(os.environ.get("ORIG_DIR") or "")
    if not os.path.isfile(os.path.join(orig, "mainKD.py")):
        raise SystemExit("ORIG_DIR must name an exported tree of the original BiDf-MKD (mainKD.py not found)")
    harness = os.path.abspath(os.environ.get("ORIG_HARNESS") or os.path.join(SHARED, "original-harness"))
    if not os.path.isfile(os.path.join(harness, "cpu_patch.py")):
        raise SystemExit(f"the original-harness (cpu_patch.py) is not at {harness}; set ORIG_HARNESS")
    clash = ("synthesis", "methods", "dataset", "network", "core", "accel")
    loaded = [m for m in sys.modules if m.split(".")[0] in clash]
    if loaded:
        raise SystemExit(f"project modules already imported ({loaded[:3]}...): the original's would clash")
    # the original's packages have the project's names: the repository must not be on the path
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO]
    sys.path[:0] = [harness, orig]
    import cpu_patch
    cpu_patch.apply_cpu()
    cpu_patch.install_omniglot_stub()
    import black_box_tool
    import methods.maml
    import network as onet
    import synthesis.contrastive
    for mod in (black_box_tool, methods.maml, onet, synthesis.contrastive):
        assert os.path.abspath(mod.__file__).startswith(orig + os.sep), f"{mod.__name__} is not the original's"
    O.bbt, O.maml, O.net, O.con, O.dir, O.harness, O.cpu_patch = (black_box_tool, methods.maml, onet,
                                                                    synthesis.contrastive, orig, harness, cpu_patch)


def orig_args(**kw) -> argparse.Namespace:
    """mainKD.py's argparse defaults for cifar100, and what it sets after parsing (img_size, channel, class_num)."""
    a = dict(multigpu="0", gpu=0, dataset="cifar100", pretrained_path_prefix="./pretrained_blackbox",
             way_train=5, num_sup_train=5, num_qur_train=15, way_test=5, num_sup_test=5, num_qur_test=15,
             backbone="conv4", episode_train=240000, episode_test=600, start_id=1, inner_update_num=5,
             test_inner_update_num=10, inner_lr=0.01, outer_lr=0.001, approx=False, episode_batch=4,
             val_interval=2000, save_interval=2000, num_sup_kd=30, num_qur_kd=30, inner_update_num_kd=10,
             adv=1.0, advstartit=-1, way_pretrain=5, APInum=100, pre_backbone="conv4", pretrain=False,
             generate_interval=200, generate_iterations=200, Glr=0.001, ZO=False, mu=0.005, q=100, numsplit=5,
             img_size=32, channel=3, class_num=64)
    a.update(kw)
    return argparse.Namespace(**a)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def step_hooks(pre, post):
    """Global optimiser step hooks (every torch.optim optimiser), removed on exit."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    h1, h2 = register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def caller_frame(code):
    """The innermost running frame of `code` (a function of the original), from inside a hook."""
    f = sys._getframe(1)
    while f is not None and f.f_code is not code:
        f = f.f_back
    if f is None:
        raise RuntimeError(f"{code.co_name} is not running")
    return f


def fixed_transform(args, crops: list):
    """The original's own get_transform_no_toTensor(args) (RandomCrop(32, padding=4), RandomHorizontalFlip,
    Normalize with its constants), each call with the next fixed (top, left, flip) of `crops`: RandomCrop's
    get_params returns it, the flip's probability is 1 or 0. Returns (transform, the Compose)."""
    t = O.bbt.get_transform_no_toTensor(args)
    crop, flip, _ = t.transforms
    todo = list(crops)

    def apply(x):
        i, j, f = todo.pop(0)
        crop.get_params = lambda img, size: (int(i), int(j), size[0], size[1])
        flip.p = 1.0 if f else 0.0
        return t(x)
    return apply, t


def load_api_model(dtype):
    """The original's teacher as mainKD.py builds it (get_premodel, load_state_dict of the API file), eval."""
    ck = torch.load(API_SRC, weights_only=True)
    teacher = O.bbt.get_premodel(orig_args())
    teacher.load_state_dict(ck["teacher"])
    return teacher.to(dtype).eval(), list(ck["specific"])


def meta_model(meta_init: dict, dtype):
    """The original's meta model (get_model: Conv4 with fast-weight layers, batch-norm on batch statistics)
    with the fixed initial weights."""
    m = O.bbt.get_model(orig_args(), "train")
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(meta_init[k])
    return m.to(dtype)


def sample_index(numel: int, seed: int) -> torch.Tensor:
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:SAMPLE].sort().values.int()


# ----------------------------------------------------------------------------- common inputs

def make_common() -> dict:
    O.bbt.setup_seed(META_SEED)
    m = O.bbt.get_model(orig_args(), "train")       # the original's initialisation (init_layer), as mainKD.py
    meta_init = {k: p.detach().clone() for k, p in m.named_parameters()}
    norm = O.bbt.get_transform_no_toTensor(orig_args()).transforms[-1]
    return {"meta_init": meta_init,
            "norm_mean": torch.tensor(norm.mean, dtype=torch.float64),
            "norm_std": torch.tensor(norm.std, dtype=torch.float64)}


# ----------------------------------------------------------------------------- case a: zero-order generator steps

U_SCALE = 16                # directions are saved as int8: u = int8 / U_SCALE (quantised N(0, 1), exact in any dtype)
PROBE = 256                 # pixels per image of the normalised inputs kept (index saved)


def zo_inputs(seed: int, steps: int, q: int, per_class: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = WAY * per_class
    gen_shapes = [(k, tuple(p.shape)) for k, p in O.bbt.Generator(nz=NZ, ngf=64, img_size=32, nc=3).named_parameters()]
    gw = generator_weights(seed, gen_shapes)
    crops = torch.stack([torch.randint(0, 9, (steps,), generator=g), torch.randint(0, 9, (steps,), generator=g),
                         torch.randint(0, 2, (steps,), generator=g)], 1)
    u = torch.randn(steps, q, b, 3, 32, 32, generator=g).mul(U_SCALE).round().clamp(-127, 127).to(torch.int8)
    return {
        "targets": torch.arange(WAY).repeat(per_class),                 # the original's order: class-interleaved
        "z": torch.randn(b, NZ, generator=g),
        "u_int8": u, "u_scale": U_SCALE,       # raw directions u[step, j, image] = u_int8 / u_scale (both normalise)
        "crops": crops,                                                 # per step: (top, left, flip)
        "gen_seed": seed, "gen_shapes": gen_shapes, "gen_fingerprint": fingerprint(gw),
        "sample_idx": {k: sample_index(int(torch.Size(s).numel()), seed + i)
                       for i, (k, s) in enumerate(gen_shapes) if torch.Size(s).numel() > SAMPLE},
        "probe_idx": sample_index(3 * 32 * 32, seed - 1)[:PROBE],
        "_gw": gw,
    }


def run_zo(inp: dict, settings: dict, meta_init: dict | None, dtype) -> dict:
    """One call of BlackBoxSynthesizer.synthesize for settings['steps'] generator steps."""
    steps, q, ns = settings["steps"], settings["q"], settings["numsplit"]
    args = orig_args(ZO=True, q=q, numsplit=ns, mu=settings["mu"], adv=settings["adv"], Glr=settings["Glr"])
    rec = {k: [] for k in ("objective", "grad_est", "inputs_change", "inputs", "z_grad", "z_after", "g_grad",
                           "g_after", "t_logits", "s_logits", "ce0", "adv0")}
    b, d = len(inp["targets"]), 3 * 32 * 32
    with default_dtype(dtype):
        teacher, specific = load_api_model(dtype)
        generator = O.bbt.Generator(nz=NZ, ngf=64, img_size=32, nc=3).to(dtype)
        student = meta_model(meta_init, dtype) if meta_init is not None else None
        transform, _ = fixed_transform(args, inp["crops"].tolist())
        tmp = tempfile.mkdtemp(prefix="golden_pool_")
        synth = O.con.BlackBoxSynthesizer(args, None, None, generator, nz=NZ, num_classes=64, img_size=(3, 32, 32),
                                          iterations=steps, lr_g=args.Glr, synthesis_batch_size=30, oh=1.0,
                                          adv=args.adv, save_dir=tmp, transform=O.bbt.get_transform(args),
                                          transform_no_toTensor=transform, device=args.gpu, c_abs_list=None,
                                          max_batch_per_class=20)
        synth.teacher, synth.c_abs_list = teacher, specific
        z = inp["z"].to(dtype).clone()
        u = inp["u_int8"].to(dtype) / inp["u_scale"]
        # the directions, in the order the original asks for them: per step, per split, [q/ns * B, d]
        dirs = [u[s, k * (q // ns):(k + 1) * (q // ns)].reshape(-1, d) for s in range(steps) for k in range(ns)]

        def randn(*a, size=None, **kw):
            assert tuple(size) == (b, NZ), size
            return z

        def normal(mean, std, size=None, **kw):
            v = dirs.pop(0)
            assert tuple(size) == tuple(v.shape), (size, v.shape)
            return v.clone()

        def reset(model):
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(inp["_gw"][k])

        code = O.con.BlackBoxSynthesizer.synthesize.__code__
        names = [k for k, _ in inp["gen_shapes"]]

        def pick(k, t):
            t = t.detach().flatten()
            return (t[inp["sample_idx"][k]] if k in inp["sample_idx"] else t).clone()

        def pre(opt, a, kw):
            f = caller_frame(code).f_locals
            rec["objective"].append(f["loss"].detach().clone())
            rec["grad_est"].append(f["grad_est"].detach().clone())
            rec["inputs_change"].append(f["inputs_change"].detach().flatten(1)[:, inp["probe_idx"]].clone())
            rec["inputs"].append(f["inputs"])               # kept by reference: best_inputs is inputs.data
            rec["z_grad"].append(z.grad.detach().clone())
            rec["g_grad"].append({k: pick(k, p.grad) for k, p in zip(names, generator.parameters())})
            rec["t_logits"].append(f["original_t_out"].detach().clone())
            rec["ce0"].append(f["original_loss_oh"].detach().clone())
            if "s_out" in f:
                rec["s_logits"].append(f["s_out"].detach().clone())
                rec["adv0"].append(f["original_loss_adv"].detach().clone())

        def post(opt, a, kw):
            rec["z_after"].append(z.detach().clone())
            rec["g_after"].append({k: pick(k, p) for k, p in zip(names, generator.parameters())})

        with patched(torch, "randn", randn), patched(torch, "normal", normal), patched(O.con, "reset_model", reset), \
                step_hooks(pre, post):
            best = synth.synthesize(targets=torch.LongTensor(inp["targets"].tolist()), student=student,
                                    mode="support", c_num=WAY)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not dirs, "directions left unused"
    kept = [s for s, x in enumerate(rec["inputs"]) if x.data_ptr() == best.data_ptr()]
    assert len(kept) == 1, kept
    out = {
        "objective": torch.stack(rec["objective"]),                         # the scalar `loss` of each step
        "kept_step": kept[0],
        "grad_est_all": torch.stack(rec["grad_est"]).view(steps, b, 3, 32, 32),
        "inputs_change_probe": torch.stack(rec["inputs_change"]),
        "image_sums": torch.stack([x.detach().flatten(1).sum(1) for x in rec["inputs"]]),
        "ce0": torch.stack(rec["ce0"]),
        "z_grad": torch.stack(rec["z_grad"]),
        "z_after": torch.stack(rec["z_after"]),
        "g_grad": {k: torch.stack([r[k] for r in rec["g_grad"]]).float() for k in names},
        "g_after": {k: torch.stack([r[k] for r in rec["g_after"]]).float() for k in names},
        "t_logits": torch.stack(rec["t_logits"]),
    }
    if rec["s_logits"]:
        out["s_logits"] = torch.stack(rec["s_logits"])
        out["adv0"] = torch.stack(rec["adv0"])
    return out


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case_zo(seed: int, steps: int, student: bool, common: dict, per_class: int = 2, q: int = 2,
            numsplit: int = 2) -> dict:
    inp = zo_inputs(seed, steps, q, per_class)
    settings = {"steps": steps, "q": q, "numsplit": numsplit, "mu": 0.005, "adv": 1.0 if student else 0.0,
                "Glr": 0.001, "per_class": per_class, "way": WAY, "student": "meta_init" if student else "none"}
    meta = common["meta_init"] if student else None
    o64 = run_zo(inp, settings, meta, torch.float64)
    o32 = run_zo(inp, settings, meta, torch.float32)
    if student:     # the seed is one where the API and the student agree on some images and not on others
        agree = o64["t_logits"][0].argmax(1) == o64["s_logits"][0].argmax(1)
        assert agree.any() and not agree.all(), "pick another seed: the boundary term's mask is constant"
    inp.pop("_gw")
    ge64, ge32 = o64.pop("grad_est_all"), o32.pop("grad_est_all")
    o64["grad_est"] = ge64[0].clone()                                       # step 0's, [B, 3, 32, 32]
    for k in ("z_grad", "z_after"):         # float32 is enough: the project keeps z in float32 (recover)
        o64[k] = o64[k].float()
    # the float32 run: its scalars and small tensors, and how far its large ones are from the float64 run's
    thin = {k: o32[k] for k in ("objective", "kept_step", "ce0", "t_logits", "image_sums")}
    thin["z_grad"] = o32["z_grad"].float()
    thin["rel_vs64"] = {"grad_est": torch.tensor([rel(ge32[s], ge64[s]) for s in range(steps)]),
                        "z_grad": torch.tensor([rel(o32["z_grad"][s], o64["z_grad"][s]) for s in range(steps)]),
                        **{f"g_grad.{k}": torch.tensor([rel(o32["g_grad"][k][s], o64["g_grad"][k][s])
                                                         for s in range(steps)]) for k in o64["g_grad"]}}
    return {"settings": settings, "inputs": inp, "out64": o64, "out32": thin}


# ----------------------------------------------------------------------------- case b: bi-level KD

def case_kd(seed: int, common: dict, num_sup: int = 2, num_qur: int = 3) -> dict:
    """mainKD.py's API visit after recovery: transform_no_toTensor(support) -> MamlKD.run_inner (F.kl_div,
    inner_update_num_kd steps) -> transform_no_toTensor(query) -> MamlKD.run_outer -> backward."""
    g = torch.Generator().manual_seed(seed)
    inp = {"support": torch.rand(WAY * num_sup, 3, 32, 32, generator=g).half(),    # recovered images in [0, 1],
           "query": torch.rand(WAY * num_qur, 3, 32, 32, generator=g).half(),      # the original's order
           "crops": torch.stack([torch.randint(0, 9, (2,), generator=g), torch.randint(0, 9, (2,), generator=g),
                                 torch.tensor([1, 0])], 1),                         # support's, then query's
           "targets_support": torch.arange(WAY).repeat(num_sup), "targets_query": torch.arange(WAY).repeat(num_qur)}
    args = orig_args(num_sup_kd=num_sup, num_qur_kd=num_qur)
    settings = {"num_sup_kd": num_sup, "num_qur_kd": num_qur, "inner_update_num_kd": args.inner_update_num_kd,
                "inner_lr": args.inner_lr, "approx": args.approx, "way": WAY}

    def run(dtype):
        with default_dtype(dtype):
            teacher, _ = load_api_model(dtype)
            model = meta_model(common["meta_init"], dtype)
            transform, _ = fixed_transform(args, inp["crops"].tolist())
            kd = O.maml.MamlKD(args)
            support_data = transform(inp["support"].to(dtype))
            kd.run_inner(model_maml=model, support=support_data, criteria=F.kl_div, device=0, teacher=teacher,
                         mode="train")
            query_data = transform(inp["query"].to(dtype))
            with torch.no_grad():
                student = model(query_data)             # f_theta' (fast weights): the boundary term's student
            loss, acc = kd.run_outer(model_maml=model, query=query_data,
                                     query_label=torch.LongTensor(inp["targets_query"].tolist()),
                                     criteria=F.kl_div, device=0, teacher=teacher, mode="train")
            loss.backward()
            return {"loss": loss.detach(), "acc": torch.as_tensor(float(acc)), "student_logits": student,
                    "meta_grad": {k: p.grad.detach().clone() for k, p in model.named_parameters()}}
    o64, o32 = run(torch.float64), run(torch.float32)
    return {"settings": settings, "inputs": inp, "out64": o64, "out32": o32}


# ----------------------------------------------------------------------------- case c: MAML on a replay task

def class_images(g, n_per: int, way: int = WAY) -> torch.Tensor:
    """Normalised images of `way` classes, class-interleaved as the original orders a task (label i % way):
    a class pattern plus noise, so that a few inner steps make a difference."""
    base = torch.randn(way, 3, 32, 32, generator=g)
    return torch.stack([base[i % way] + 0.5 * torch.randn(3, 32, 32, generator=g)
                        for i in range(way * n_per)]).half()


def case_maml(seed: int, common: dict, train=(1, 2), test=(1, 3)) -> dict:
    """Maml.run, mode 'train' (inner_update_num steps, second order; outer loss backward) and mode 'test'
    (test_inner_update_num steps; loss and accuracy) on fixed tasks of already normalised images."""
    g = torch.Generator().manual_seed(seed)
    args = orig_args(num_sup_train=train[0], num_qur_train=train[1], num_sup_test=test[0], num_qur_test=test[1])
    inp = {"train_support": class_images(g, train[0]), "train_query": class_images(g, train[1]),
           "test_support": class_images(g, test[0]), "test_query": class_images(g, test[1])}
    for k in list(inp):
        inp[k + "_label"] = torch.arange(WAY).repeat(inp[k].shape[0] // WAY)
    settings = {"way_train": args.way_train, "num_sup_train": train[0], "num_qur_train": train[1],
                "way_test": args.way_test, "num_sup_test": test[0], "num_qur_test": test[1],
                "inner_update_num": args.inner_update_num, "test_inner_update_num": args.test_inner_update_num,
                "inner_lr": args.inner_lr, "approx": args.approx}

    def run(dtype):
        with default_dtype(dtype):
            maml = O.maml.Maml(args)
            model = meta_model(common["meta_init"], dtype)
            crit = torch.nn.CrossEntropyLoss()
            x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inp.items()}
            loss, acc = maml.run(model, x["train_support"], x["train_support_label"], x["train_query"],
                                 x["train_query_label"], crit, 0, mode="train")
            loss.backward()
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
            model = meta_model(common["meta_init"], dtype)
            tloss, tacc = maml.run(model, x["test_support"], x["test_support_label"], x["test_query"],
                                   x["test_query_label"], crit, 0, mode="test")
            return {"train_loss": loss.detach(), "train_acc": torch.as_tensor(float(acc)), "meta_grad": grads,
                    "test_loss": tloss.detach(), "test_acc": torch.as_tensor(float(tacc))}
    o64, o32 = run(torch.float64), run(torch.float32)
    return {"settings": settings, "inputs": inp, "out64": o64, "out32": o32}


# ----------------------------------------------------------------------------- case d: pretraining an API

def case_pretrain(seed: int, common: dict, batch: int = 12, head_scale: float = 1.0) -> dict:
    """black_box_tool.pretrain (the conv4 API's recipe: Adam lr 0.01, CrossEntropyLoss, clip_grad_norm_ 50) for
    one epoch of two fixed batches: its dataset and DataLoader are replaced by the two batches, num_epoch by 1
    (the harness's patch_pretrain_epochs), the Conv4 it builds starts from the meta model's initial weights
    with the head's weight times head_scale (large logits: gradient norms above 50, so the clip acts, by a
    different factor at each step, which Adam's second step sees)."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    args = orig_args(pretrain=True)
    specific = [3, 17, 25, 40, 61]
    u8 = [torch.randint(0, 256, (batch, 32, 32, 3), generator=g, dtype=torch.uint8) for _ in range(2)]
    labels = [torch.tensor(specific)[torch.randint(0, WAY, (batch,), generator=g)] for _ in range(2)]
    inp = {"images_hwc_uint8": torch.stack(u8), "labels_abs": torch.stack(labels), "specific": torch.tensor(specific),
           "head_scale": head_scale, "init": "common meta_init's parameters, trunk.5.weight times head_scale; "
                                             "batch-norm buffers 0 / 1"}
    settings = {"arch": "conv4", "epochs": 1, "steps": 2, "batch": batch, "way_pretrain": WAY}

    def run(dtype):
        rec = {"clip_norm": [], "loss": [], "after": [], "buffers": []}
        with default_dtype(dtype):
            transform = O.bbt.get_transform(args)      # Resize(32), ToTensor, Normalize: the datasets' transform
            batches = [(torch.stack([transform(Image.fromarray(im.numpy())) for im in u8[i]]), labels[i])
                       for i in range(2)]
            real_conv4, real_clip = O.bbt.Conv4, torch.nn.utils.clip_grad_norm_

            class Data:
                def __init__(self, setname, specific=None, mode="train", **kw):
                    self.mode, self.img_size = mode, 32

                def __len__(self):
                    return WAY * (480 if self.mode == "train" else 120)

            def loader(dataset=None, **kw):
                return batches if dataset.mode == "train" else batches[:1]

            def conv4(**kw):
                m = real_conv4(**kw)
                with torch.no_grad():
                    for k, p in m.named_parameters():
                        p.copy_(common["meta_init"][k] * (head_scale if k == "trunk.5.weight" else 1))
                return m.to(dtype)

            def clip(params, max_norm, *a, **kw):
                n = real_clip(params, max_norm, *a, **kw)
                rec["clip_norm"].append(n.detach().clone())
                return n

            def post(opt, a, kw):
                f = caller_frame(O.bbt.pretrain.__code__).f_locals
                rec["loss"].append(f["loss"].detach().clone())
                rec["after"].append({k: p.detach().clone() for k, p in f["teacher"].named_parameters()})
                rec["buffers"].append({k: b.detach().clone() for k, b in f["teacher"].named_buffers()
                                       if "num_batches" not in k and ".trunk." not in k})

            O.cpu_patch.patch_pretrain_epochs(O.bbt, 1)
            with patched(O.bbt, "Cifar100_Specific", Data), patched(torch.utils.data, "DataLoader", loader), \
                    patched(O.bbt, "Conv4", conv4), patched(torch.nn.utils, "clip_grad_norm_", clip), \
                    step_hooks(lambda *a: None, post), contextlib.redirect_stdout(open(os.devnull, "w")):
                O.bbt.pretrain(args, specific, 0)
        assert len(rec["after"]) == 2
        return {"clip_norm": torch.stack(rec["clip_norm"]), "loss": torch.stack(rec["loss"]),
                "after": rec["after"], "buffers": rec["buffers"]}
    o64, o32 = run(torch.float64), run(torch.float32)
    # the float32 run's weights: only how far they are from the float64 run's, per step
    o32["after_maxdiff_vs64"] = torch.tensor([max((a[k].double() - b[k]).abs().max().item() for k in b)
                                              for a, b in zip(o32.pop("after"), o64["after"])])
    return {"settings": settings, "inputs": inp, "out64": o64, "out32": o32}


# ----------------------------------------------------------------------------- main

CASES = {
    "zo_support": lambda common: case_zo(11, 2, False, common),
    "zo_query": lambda common: case_zo(27, 1, True, common),
    "kd": lambda common: case_kd(21, common),
    "maml": lambda common: case_maml(31, common),
    "pretrain": lambda common: case_pretrain(41, common, head_scale=8.0),
}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "golden"))
    ap.add_argument("--cases", nargs="*", default=list(CASES), help=f"subset of {', '.join(CASES)}")
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out)
    if not os.path.isfile(API_SRC):
        raise SystemExit(f"the shared pool file {API_SRC} is missing (../shared/fixtures/original-checkpoints)")
    load_original()
    torch.set_num_threads(1)        # one summation order, whatever the machine
    os.makedirs(out, exist_ok=True)
    about = {"command": f"ORIG_DIR={O.dir} python -m experiments.golden --out {a.out}", "orig_commit": ORIG_COMMIT,
             "torch": str(torch.__version__), "date": datetime.date.today().isoformat(),
             "api_sha256": sha256(API_SRC)}
    shutil.copyfile(API_SRC, os.path.join(out, API_FILE))
    common = make_common()
    torch.save({"about": about, **common}, os.path.join(out, "common.pt"))
    for name in a.cases:
        res = CASES[name](common)
        res["about"] = about
        path = os.path.join(out, f"{name}.pt")
        torch.save(res, path)
        print(f"{path}: {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
