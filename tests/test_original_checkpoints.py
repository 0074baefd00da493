"""network/original.py and the original's files: checkpoints written by the original BiDf-MKD code load into our
networks and give the same probabilities, its pools serve as API pools, its pretraining command works; the
original's initialisation; the ResNet-34/50/101 backbones."""
from __future__ import annotations

import math
import os
import re
from typing import Mapping

import pytest
import torch

import network
from core.io import load_checkpoint
from network import original

from conftest import DEVICE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.normpath(os.path.join(REPO, "..", "shared", "fixtures", "original-checkpoints"))
POOLS = [("cifar100", "conv4"), ("miniimagenet", "conv4"), ("cifar100", "resnet10")]
TOL = 1e-5

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

needs_fixtures = pytest.mark.skipif(
    not os.path.isdir(FIXTURES),
    reason=f"original-format checkpoints not found at {FIXTURES} (the shared fixtures folder)")


def to_original(state: Mapping[str, torch.Tensor], arch: str | None = None, *,
                pool: str | None = None) -> dict[str, torch.Tensor]:
    """The inverse of network.original.to_project, for the round trips below: this project's state dict
    renamed as the original's (stem_relu=False ResNets only: the original has no stem ReLU, which the
    names cannot show). Conv4 gets both names of each tensor, as the
    original saves them; pool ('flatten' | 'max') places the head, default from the head's shape.
    Missing batch-norm statistics (batch_stats models) are filled with the defaults (0, 1, 0).
    """
    held = original.describe(state)
    if held.naming != "project":
        raise ValueError(f"the state dict already has the original's names (a {held.arch})")
    arch = original._check_arch(held, arch)
    pool = pool or held.pool or "flatten"
    out = {}
    for o, p in original._pairs(arch, pool):
        if p in state:
            out[o] = state[p]
        elif original._is_buffer(p):
            c = out[o.rsplit(".", 1)[0] + ".weight"].shape[0]
            out[o] = {"running_mean": torch.zeros(c), "running_var": torch.ones(c),
                      "num_batches_tracked": torch.tensor(0)}[p.rsplit(".", 1)[-1]]
        else:
            raise ValueError(f"the {arch} state dict lacks {p!r}")
    if arch == "conv4":
        for k in list(out):
            m = re.fullmatch(r"trunk\.(\d)\.(C|BN)\.(\w+)", k)
            if m:
                out[f"trunk.{m[1]}.trunk.{0 if m[2] == 'C' else 1}.{m[3]}"] = out[k]
    return out


def _api_file(dataset: str, arch: str) -> str:
    return os.path.join(FIXTURES, "pool", dataset, arch, "meta_train", "5way", "model", "model_specific_0.pth")


def _reference(dataset: str, arch: str) -> dict:
    return torch.load(os.path.join(FIXTURES, f"reference_{dataset}_{arch}.pt"), weights_only=True)


def _loaded(dataset: str, arch: str, **kw):
    """network.build(...) with the file's weights mapped by network.original, strict, eval mode."""
    from dataset.specs import get_spec
    spec = get_spec(dataset)
    ckpt = load_checkpoint(_api_file(dataset, arch))
    held = original.describe(ckpt["teacher"])
    model = network.build(arch, 5, channels=spec.channels, image_size=spec.image_size,
                          pool=held.pool or "flatten", **kw)
    model.load_state_dict(original.to_project(ckpt["teacher"], arch), strict=True)
    return model.eval(), ckpt, spec


@needs_fixtures
@pytest.mark.parametrize("dataset,arch", POOLS)
def test_original_checkpoint_reproduces_probs(dataset, arch):
    from synthesis.api import BlackBoxAPI
    model, ckpt, spec = _loaded(dataset, arch)
    ref = _reference(dataset, arch)
    assert original.is_original_checkpoint(ckpt)
    assert original.describe(ckpt["teacher"]).arch == arch
    assert list(ckpt["specific"]) == ref["specific"].tolist()
    x, want = ref["x_normalised"].to(DEVICE), ref["probs"].to(DEVICE)
    with torch.no_grad():
        probs = torch.softmax(model.to(DEVICE)(x), dim=1)
    assert (probs - want).abs().max() <= TOL

    api = BlackBoxAPI(model, ckpt["specific"], spec, arch, device=DEVICE)      # batch-norm folded, fast path
    assert (api(x) - want).abs().max() <= TOL
    assert api.classes == ref["specific"].tolist()


@needs_fixtures
@pytest.mark.parametrize("dataset,arch", POOLS)
def test_build_original_and_round_trip(dataset, arch):
    """build_original checks what the caller expects; to_original gives back the file's state dict."""
    from dataset.specs import get_spec
    spec = get_spec(dataset)
    ckpt = load_checkpoint(_api_file(dataset, arch))
    model, classes = original.build_original(ckpt, arch, way=5, channels=3, image_size=spec.image_size)
    assert not model.training and classes == list(ckpt["specific"])
    ref = _reference(dataset, arch)
    with torch.no_grad():
        probs = torch.softmax(model.to(DEVICE)(ref["x_normalised"].to(DEVICE)), 1)
        assert (probs - ref["probs"].to(DEVICE)).abs().max() <= TOL

    back = to_original(model.cpu().state_dict(), arch)
    assert set(back) == set(ckpt["teacher"])
    assert all(torch.equal(back[k], v) for k, v in ckpt["teacher"].items())

    # The meta model (batch statistics only) takes the same weights without the running statistics.
    meta = network.build(arch, 5, image_size=spec.image_size, batch_stats=True)
    meta.load_state_dict(original.to_project(ckpt["teacher"], batch_stats=True), strict=True)


@needs_fixtures
def test_resnet_stem_relu_is_not_the_original():
    """The original stem has no ReLU: with one, the fixture's probabilities are not reproduced."""
    model, _, _ = _loaded("cifar100", "resnet10", stem_relu=True)
    ref = _reference("cifar100", "resnet10")
    with torch.no_grad():
        probs = torch.softmax(model.to(DEVICE)(ref["x_normalised"].to(DEVICE)), dim=1)
    assert (probs - ref["probs"].to(DEVICE)).abs().max() > 1e-3


@needs_fixtures
@pytest.mark.parametrize("dataset,arch,asked", [("cifar100", "resnet10", "resnet18"),
                                                ("cifar100", "conv4", "resnet10"),
                                                ("miniimagenet", "conv4", "resnet50")])
def test_wrong_architecture_names_the_held_one(dataset, arch, asked):
    ckpt = load_checkpoint(_api_file(dataset, arch))
    for call in (lambda: original.to_project(ckpt["teacher"], asked),
                 lambda: original.build_original(ckpt, asked)):
        with pytest.raises(ValueError, match=f"holds a {arch}, not a {asked}") as e:
            call()
        assert "\n" not in str(e.value)


@needs_fixtures
def test_other_mismatches_are_value_errors(tmp_path):
    ckpt = load_checkpoint(_api_file("miniimagenet", "conv4"))
    with pytest.raises(ValueError, match="80-95px inputs, not 32px"):
        original.build_original(ckpt, "conv4", image_size=32)
    with pytest.raises(ValueError, match="5-way conv4, not 10-way"):
        original.build_original(ckpt, way=10)
    with pytest.raises(ValueError, match="3-channel inputs, not 1"):
        original.build_original(ckpt, channels=1)
    bad = dict(ckpt["teacher"], **{"trunk.9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected entry 'trunk.9.weight'"):
        original.to_project(bad)
    torch.save({"state_dict": {}}, tmp_path / "ours.pth")
    ours = load_checkpoint(str(tmp_path / "ours.pth"))
    assert not original.is_original_checkpoint(ours)
    with pytest.raises(ValueError, match="not an original BiDf-MKD API checkpoint"):
        original.build_original(ours)


@pytest.mark.parametrize("arch", network.ARCHS)
def test_name_mapping_round_trip_for_every_arch(arch):
    """Every architecture maps to the original's names and back, and is recognised in both namings."""
    model = network.build(arch, 7, init="torch")
    ours = model.state_dict()
    theirs = to_original(ours)
    assert all(k.startswith("trunk.") for k in theirs)
    assert original.describe(ours).arch == original.describe(theirs).arch == arch
    back = original.to_project(theirs)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_original_key_layout_of_resnet50():
    """The original's bottleneck: a bias on the 3x3 convolution only, a projection shortcut without BN."""
    theirs = to_original(network.build("resnet50", 5, init="torch").state_dict())
    assert "trunk.2.C2.bias" in theirs and "trunk.2.C1.bias" not in theirs and "trunk.2.C3.bias" not in theirs
    assert "trunk.2.shortcut.weight" in theirs and not any("BNshortcut" in k for k in theirs)
    assert "trunk.3.shortcut.weight" not in theirs            # same width: identity shortcut
    assert theirs["trunk.20.weight"].shape == (5, 2048)       # 16 blocks from trunk.2, then pool, flatten
    assert len(theirs) == 6 + 16 * 19 + 4 + 2


def test_init_original_statistics():
    torch.manual_seed(0)
    model = network.build("resnet18", 5)                    # init="original" is the default
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        assert abs(m.weight.mean().item()) < 0.1 * math.sqrt(2.0 / n)
        assert m.weight.std().item() == pytest.approx(math.sqrt(2.0 / n), rel=0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)

    conv4 = network.build("conv4", 5)
    w = conv4.features[1][0].weight                         # 3x3x32 fan: sigma = sqrt(2 / 288)
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (9 * 32)), rel=0.1)
    # init="torch" keeps PyTorch's kaiming-uniform default: sigma = 1 / sqrt(3 * fan_in) = 1 / sqrt(864)
    w = network.build("conv4", 5, init="torch").features[1][0].weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * 9 * 32), rel=0.1)


def test_init_original_leaves_linear_layers_alone():
    """The original's init touches convolutions and batch-norm only."""
    model = network.build("conv4", 5, init="torch")
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    bias = model.features[0][0].bias.detach().clone()
    network.init_original_(model)
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head.items())
    assert torch.equal(model.features[0][0].bias, bias)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet34", "resnet50", "resnet101"])
def test_deep_resnets_forward(arch, device):
    torch.manual_seed(0)
    model = network.build(arch, 5).to(device)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32, device=device))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    width = 512 if arch == "resnet34" else 2048
    assert model.head.in_features == width


# ------------------------------------------------------------------ the original's pools, as they are


@needs_fixtures
@pytest.mark.parametrize("dataset, arch", POOLS)
def test_original_pool_serves_the_reference_probabilities(dataset, arch):
    """An original pool folder is an API pool as it is: the black-box API gives the reference outputs."""
    from synthesis import APIPool
    pool = APIPool.load(os.path.join(FIXTURES, "pool"), dataset, arch, 5, 1, DEVICE, say=lambda m: None)
    api = pool.get(dataset, arch, 0)
    ref = _reference(dataset, arch)
    assert api.classes == [int(c) for c in ref["specific"]]
    assert torch.allclose(api(ref["x_normalised"].to(DEVICE)), ref["probs"].to(DEVICE), atol=TOL, rtol=0)


@needs_fixtures
def test_original_file_of_another_arch_is_one_line(tmp_path):
    import shutil

    from core.errors import PoolError
    from synthesis import APIPool
    from synthesis.store import pool_dir
    folder = pool_dir(str(tmp_path), "cifar100", "conv4", 5)
    os.makedirs(folder)
    shutil.copy(_api_file("cifar100", "resnet10"), os.path.join(folder, "model_specific_0.pth"))
    with pytest.raises(PoolError, match=r"model_specific_0\.pth .*holding a resnet10, not a conv4") as e:
        APIPool.load(str(tmp_path), "cifar100", "conv4", 5, 1, DEVICE, say=lambda m: None)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@needs_fixtures
def test_synthesis_command_recovers_from_an_original_pool(tmp_path):
    from conftest import run_cli
    grid = tmp_path / "grid.png"
    proc = run_cli(["-m", "synthesis", "--pretrained_path_prefix", os.path.join(FIXTURES, "pool"), "--dataset",
                    "cifar100", "--pre_backbone", "conv4", "--ZO", "--q", "2", "--numsplit", "1",
                    "--generate_iterations", "2", "--num_per_class", "2", "--out", str(grid), "--no_progress"])
    import json
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert grid.is_file() and out["api_queries"] == 2 * 5 * 2 * (2 + 1)


# The flags of the original's scriptskd/pretrain.sh (its mainKD.py --pretrain), on the demo data.
ORIGINAL_PRETRAIN = ["--multigpu", "0", "--gpu", "0", "--way_train", "5", "--num_sup_train", "1", "--num_qur_train",
                     "15", "--way_test", "5", "--num_sup_test", "1", "--num_qur_test", "15", "--backbone", "conv4",
                     "--episode_train", "240000", "--episode_test", "600", "--inner_update_num", "5",
                     "--test_inner_update_num", "10", "--start_id", "1", "--inner_lr", "0.01", "--outer_lr", "0.001",
                     "--episode_batch", "4", "--val_interval", "2000", "--save_interval", "2000", "--num_sup_kd", "30",
                     "--num_qur_kd", "30", "--inner_update_num_kd", "10", "--adv", "1", "--advstartit", "4000",
                     "--way_pretrain", "5", "--pre_backbone", "conv4", "--generate_interval", "200",
                     "--generate_iterations", "200", "--Glr", "0.001", "--ZO", "--mu", "0.005", "--q", "100",
                     "--numsplit", "5", "--pretrain"]


@pytest.mark.slow
def test_main_pretrain_with_the_original_flags_makes_a_usable_pool(demo_root, tmp_path):
    from conftest import run_cli
    prefix = str(tmp_path / "pool")
    where = ["--dataset", "demo", "--data_root", demo_root, "--pretrained_path_prefix", prefix]
    run_cli(["main.py", *ORIGINAL_PRETRAIN, *where, "--APInum", "2", "--epochs", "1", "--no-tensorboard"])
    tiny = ["--APInum", "2", "--q", "2", "--numsplit", "1", "--generate_iterations", "2", "--num_sup_kd", "2",
            "--num_qur_kd", "3", "--inner_update_num_kd", "1", "--num_sup_train", "1", "--num_qur_train", "2",
            "--inner_update_num", "1", "--episode_train", "4", "--episode_test", "2", "--val_interval", "4",
            "--save_interval", "4", "--test_inner_update_num", "1", "--max_batch_per_class", "4"]
    flags = [f for f in ORIGINAL_PRETRAIN if f != "--pretrain"]
    proc = run_cli(["main.py", *flags, *where, *tiny, "--out_dir", str(tmp_path / "run")])
    summary = __import__("json").load(open(tmp_path / "run" / "summary.json"))
    assert summary["api_visits"] >= 1 and summary["tasks"] == 4, proc.stdout


@pytest.mark.slow
def test_mix_dataset_with_one_arch_is_one_line(demo_root, tmp_path):
    from conftest import run_cli
    proc = run_cli(["main.py", "--dataset", "mix", "--pre_backbone", "conv4", "--out_dir", str(tmp_path / "r")],
                   check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--pre_backbone mix" in lines[0]
