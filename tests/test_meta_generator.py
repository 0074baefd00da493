"""synthesis/meta_generator.py (--meta_generator): the Reptile update, codes per absolute class and kind, a visit
through a strict black box and its query count, and the state in the checkpoint across --resume (recover()'s
initial/final state: test_recover.py)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn

from core.config import Config, visit_cost
from core.errors import FlagError
from synthesis.meta_generator import MetaGenerator, reptile

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow


def test_reptile_moves_phi_toward_the_visit_and_keeps_integer_buffers():
    phi = {"w": torch.zeros(3), "n": torch.tensor(2)}
    new = {"w": torch.tensor([1.0, 2.0, 4.0]), "n": torch.tensor(7)}
    out = reptile(phi, new, 0.25)
    assert torch.equal(out["w"], torch.tensor([0.25, 0.5, 1.0])) and int(out["n"]) == 7
    assert torch.equal(reptile(None, new, 0.25)["w"], new["w"])       # first visit: φ = φ'
    assert torch.equal(phi["w"], torch.zeros(3))                        # pure: φ untouched


def test_codes_are_kept_per_absolute_class_and_kind():
    mg = MetaGenerator(lr=0.5)
    assert mg.start("support", [3, 9], 2, 4, "cpu") is None             # nothing learnt: a fresh start
    z1 = torch.arange(16.0).view(4, 4)
    mg.update("support", [3, 9], {"generator": {"w": torch.ones(2)}, "z": z1})
    init = mg.start("support", [9, 5], 2, 4, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(init["z"][:2], z1[2:])                           # class 9's codes, now relative class 0
    assert not torch.equal(init["z"][2:], z1[:2])                       # class 5 is new: fresh codes
    assert torch.equal(init["generator"]["w"], torch.ones(2))
    assert mg.start("query", [9], 2, 4, "cpu") is None                  # kinds do not share
    mg.update("support", [9, 5], {"generator": {"w": torch.zeros(2)}, "z": torch.zeros(4, 4)})
    assert torch.equal(mg.codes["support"][9], 0.5 * z1[2:])           # Reptile on the codes too
    assert torch.equal(mg.generators["support"]["w"], torch.full((2,), 0.5))
    again = MetaGenerator(lr=0.5)
    again.load_state_dict(mg.state_dict())
    assert again.state_dict()["updates"] == 2 and torch.equal(again.codes["support"][3], z1[:2])


def test_flags_and_visit_cost():
    cfg = Config(ZO=True, q=20, generate_iterations=40, num_sup_kd=5, num_qur_kd=15)
    assert visit_cost(cfg) == 84100                                     # the demo's visit
    cfg.meta_generator, cfg.meta_generator_steps = True, 4
    assert visit_cost(cfg) == 100 * (4 * 21 + 1)
    from core.config import check_values
    cfg.meta_generator_lr = 1.5
    with pytest.raises(FlagError, match="meta_generator_lr must be at most 1"):
        check_values(cfg)


class StrictBlackBox:
    """Only probabilities come out: inputs that need a gradient are refused, outputs are detached, and
    any other attribute (weights, parameters(), state_dict(), .model) raises."""
    _PUBLIC = ("spec", "classes", "device", "white_box", "queries", "output")

    def __init__(self, spec, classes, seed=0):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(spec.channels, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(8, len(classes))).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "_f", lambda x: torch.softmax(net(x), 1))
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "classes", list(classes))
        object.__setattr__(self, "device", torch.device("cpu"))
        object.__setattr__(self, "white_box", False)
        object.__setattr__(self, "output", "probs")
        object.__setattr__(self, "queries", 0)

    def __getattribute__(self, name):
        if name.startswith("__") or name in StrictBlackBox._PUBLIC or name == "_f":
            return object.__getattribute__(self, name)
        raise PermissionError(f"black box: no access to {name!r}")

    def __call__(self, x):
        if x.requires_grad or torch.is_grad_enabled() and x.grad_fn is not None:
            raise PermissionError("black box: input carries a graph")
        object.__setattr__(self, "queries", self.queries + x.shape[0])
        with torch.no_grad():
            return self._f(x.detach()).detach()


def test_a_meta_generator_visit_needs_nothing_but_probabilities():
    from dataset.specs import get_spec
    from methods.kd import kd_task
    from methods.maml import meta_params
    from methods.meta_model import MetaInput
    from network import build
    spec = get_spec("demo")
    api = StrictBlackBox(spec, [4, 11, 20, 33, 50])
    for forbidden in ("parameters", "state_dict", "model", "_BlackBoxAPI__logits"):
        with pytest.raises(PermissionError):
            getattr(api, forbidden)
    with pytest.raises(PermissionError):
        api(torch.zeros(1, 3, 32, 32, requires_grad=True))
    prep = MetaInput(spec.image_size, spec.channels, tuple(spec.mean), tuple(spec.std))
    model = build("conv4", 5, channels=3, image_size=32, batch_stats=True)
    s = Config(num_sup_kd=2, num_qur_kd=3, inner_update_num_kd=2, generate_iterations=50, meta_generator=True,
               meta_generator_steps=2, meta_generator_lr=0.5, ZO=True, q=3, mu=0.005, numsplit=1)
    mg = MetaGenerator(lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for visit in range(2):
        before = api.queries
        out = kd_task(model, meta_params(model), api, s, prep, boundary=True, generator=gen, meta_generator=mg)
        out.loss.backward()                                             # the outer loss reaches θ
        # each set: meta_generator_steps of (q + 1) queries per image, then one labelling query per image
        assert api.queries - before == 5 * (2 + 3) * (2 * (3 + 1) + 1)
        assert out.recovery_steps == 4
    assert mg.updates == 4 and set(mg.generators) == {"support", "query"}
    assert set(mg.codes["support"]) == {4, 11, 20, 33, 50} and mg.codes["query"][4].shape == (3, 256)


TINY_MG = ["--dataset", "demo", "--APInum", "3", "--ZO", "--q", "4", "--numsplit", "2", "--generate_iterations", "9",
           "--meta_generator", "--meta_generator_steps", "2", "--meta_generator_lr", "0.5",
           "--num_sup_kd", "2", "--num_qur_kd", "3", "--inner_update_num_kd", "2", "--way_train", "10",
           "--num_sup_train", "1", "--num_qur_train", "2", "--inner_update_num", "2", "--generate_interval", "1",
           "--way_test", "5", "--num_sup_test", "1", "--num_qur_test", "3", "--episode_test", "4",
           "--test_inner_update_num", "2", "--max_batch_per_class", "4", "--advstartit", "1"]


@pytest.mark.slow
def test_meta_generator_state_survives_resume(demo_root, demo_pool, tmp_path):
    """A run stopped after task 8 and resumed ends exactly where the uninterrupted run ends."""
    def flags(out, tasks):
        return [*TINY_MG, "--data_root", demo_root, "--pretrained_path_prefix", demo_pool, "--out_dir", out,
                "--episode_train", str(tasks), "--val_interval", "8", "--save_interval", "8"]
    from main import parse_args
    from methods.meta_train import train
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    train(parse_args(flags(whole, 16)))
    train(parse_args(flags(part, 8)))
    ck8 = torch.load(os.path.join(part, "last.pth"), weights_only=True)
    assert ck8["meta_generator"]["updates"] == 2 * ck8["state"]["api_visits"] > 0
    # continue the 8-task run as a 16-task one: the same run up to its checkpoint
    cfg = json.load(open(os.path.join(part, "config.json")))
    cfg["episode_train"] = 16
    json.dump(cfg, open(os.path.join(part, "config.json"), "w"))
    os.remove(os.path.join(part, "summary.json"))
    train(parse_args([*flags(part, 16), "--resume"]))
    a, b = (torch.load(os.path.join(d, "last.pth"), weights_only=True) for d in (whole, part))
    assert a["state"]["api_queries"] == b["state"]["api_queries"]
    for kind in ("support", "query"):
        for k, v in a["meta_generator"]["generators"][kind].items():
            assert torch.equal(v, b["meta_generator"]["generators"][kind][k]), k
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    rows = [json.loads(li) for li in open(os.path.join(whole, "metrics.jsonl"))]
    q = 5 * 5 * (2 * (4 + 1) + 1)                                         # one visit with --meta_generator
    assert all(r["queries_per_visit"] == q and r["recovery_steps_per_visit"] == 4 for r in rows)
    shutil.rmtree(part)
