"""Untrusted APIs (docs/robustness.md): deceptive pools made on demand and recorded (synthesis/deceive.py); the
judge of methods/trust.py trusts an honest API and distrusts one whose network answers for other classes,
one that answers near-uniformly, whatever a deceptive judge says; a run with --api_trust agree flags a
permuted-label API, never draws it again and never reads the truth file; a run that trusts every API is
the undefended run bit for bit (plus the judges' queries); the judge works on API-SH/MH pools."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli
from core.config import Config
from core.errors import FlagError
from core.io import load_checkpoint
from dataset.specs import get_spec
from helpers import flags, read_jsonl
from methods.memory import TaskMemory
from methods.trust import make_judge
from synthesis.deceive import TRUTH_FILE, UNIFORM_SCALE, make_deceptive_pool
from synthesis.pool import APIEntry, APIPool
from test_api_and_pool import save_fake_api

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow


# ------------------------------------------------------------------ deceptive pools
def test_a_deceptive_pool_is_a_copy_with_the_chosen_apis_changed_and_the_truth_beside_it(tmp_path):
    src, out = str(tmp_path / "clean"), str(tmp_path / "bad")
    for i in range(10):
        save_fake_api(src, "demo", "conv4", i, range(5 * (i % 4), 5 * (i % 4) + 5))
    truth = make_deceptive_pool(src, "demo", "conv4", 5, 10, 0.4, out, seed=3)
    on_disk = json.load(open(os.path.join(out, TRUTH_FILE)))
    assert on_disk == truth and truth["deceptive"] == 4
    kinds = [r["kind"] for r in truth["apis"]]
    assert sorted(kinds).count("honest") == 6 and {"labels", "untrained", "uniform"} <= set(kinds)
    pool = APIPool.load(out, "demo", "conv4", 5, 10, "cpu", say=lambda m: None)
    assert len(pool) == 10
    for r in truth["apis"]:
        a = load_checkpoint(os.path.join(src, "demo/conv4/meta_train/5way/model", f"model_specific_{r['index']}.pth"))
        b = load_checkpoint(os.path.join(out, "demo/conv4/meta_train/5way/model", f"model_specific_{r['index']}.pth"))
        assert b["classes"] == a["classes"] and b["val_acc"] == a["val_acc"]        # the claims are kept
        same = [torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]]
        if r["kind"] == "honest":
            assert all(same)
        elif r["kind"] == "labels":      # another API's trained network, on other classes
            donor = load_checkpoint(os.path.join(src, "demo/conv4/meta_train/5way/model",
                                                 f"model_specific_{r['donor'].split('/')[-1]}.pth"))
            assert all(torch.equal(donor["state_dict"][k], v) for k, v in b["state_dict"].items())
            assert set(donor["classes"]) != set(a["classes"]) and r["answers_for"] == donor["classes"]
        elif r["kind"] == "uniform":     # the classifier scaled down, the rest kept
            assert torch.allclose(b["state_dict"]["head.weight"], UNIFORM_SCALE * a["state_dict"]["head.weight"])
            assert sum(same) == len(same) - 2
        else:
            assert not all(same)
    smaller = make_deceptive_pool(src, "demo", "conv4", 5, 10, 0.2, str(tmp_path / "less"), seed=3)
    bad = {r["api"]: r["kind"] for r in truth["apis"] if r["kind"] != "honest"}
    assert all(bad[r["api"]] == r["kind"] for r in smaller["apis"] if r["kind"] != "honest")    # nested
    with pytest.raises(FlagError, match="already holds a deceptive pool"):
        make_deceptive_pool(src, "demo", "conv4", 5, 10, 0.4, out)
    with pytest.raises(FlagError, match="fraction"):
        make_deceptive_pool(src, "demo", "conv4", 5, 10, 1.5, str(tmp_path / "x"))


# ------------------------------------------------------------------ the judge, on APIs that read the class off the image
SIZE = 32


def images_of(classes, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n images per class whose channel 0 encodes the absolute class id; (images, relative labels)."""
    x = torch.rand(len(classes) * n, 3, SIZE, SIZE) * 0.1
    for rel, c in enumerate(classes):
        x[rel * n:(rel + 1) * n, 0] = c / 100
    return x, torch.arange(len(classes)).repeat_interleave(n)


class ReadsTheClass:
    """An API over `classes` whose network recognises the classes `answers_for` (itself: honest) by channel 0;
    flat: near-uniform answers."""

    def __init__(self, classes, answers_for=None, flat: bool = False):
        self.classes, self.answers_for, self.flat = list(classes), list(answers_for or classes), flat
        self.spec, self.output = get_spec("demo"), "probs"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = ((x[:, 0] * 0.25 + 0.5).mean((1, 2)) * 100).round()        # undo the demo normalisation
        logits = torch.stack([6.0 * (c == k).float() for k in self.answers_for], 1)
        return F.softmax(logits * (0.01 if self.flat else 1), dim=1)


class StubPool:
    def __init__(self, apis: dict):
        self._apis = apis
        self.apis = [APIEntry("demo", "conv4", i, "", tuple(a.classes), None) for i, a in enumerate(apis.values())]

    def open(self, e):
        return list(self._apis.values())[e.index]


def verdict(candidate: int, apis: dict, memory=None, history=None) -> dict:
    pool = StubPool(apis)
    cfg = Config(num_sup_kd=4, api_trust="agree", api_trust_judges=3)
    entry = pool.apis[candidate]
    api = pool.open(entry)
    x, y = images_of(api.answers_for, 4)         # what recovery finds: images its network calls each class
    judge = make_judge(pool, memory or TaskMemory(image_size=SIZE), entry, [], history or {}, cfg, task_id=1)
    return judge(api, x, y, api(x * 4 - 2))


A, B = (10, 11, 12, 13, 14), (20, 21, 22, 23, 24)


def test_an_honest_api_is_trusted_and_one_answering_for_other_classes_or_flatly_is_not():
    honest = verdict(0, {"a": ReadsTheClass(A), "judge": ReadsTheClass(A)})
    assert honest["trusted"] and honest["agreement"] > 0.9 and honest["sharpness"] > 0.9
    assert honest["judges"] == ["demo/conv4/1"]
    labels = verdict(0, {"a": ReadsTheClass(A, answers_for=B), "judge": ReadsTheClass(A)})
    assert not labels["trusted"] and labels["sharpness"] > 0.9 and abs(labels["agreement"]) < 0.05
    flat = verdict(0, {"a": ReadsTheClass(A, flat=True), "judge": ReadsTheClass(A)})
    assert not flat["trusted"] and flat["sharpness"] < 0.05
    alone = verdict(0, {"a": ReadsTheClass(A, answers_for=B), "other": ReadsTheClass(B)})
    assert alone["trusted"] and alone["agreement"] is None and alone["evidence"] == 0   # no API to ask


def test_a_deceptive_judge_does_not_sink_an_honest_api_and_the_verdict_averages_its_visits():
    apis = {"a": ReadsTheClass(A), "liar": ReadsTheClass(A, answers_for=B), "judge": ReadsTheClass(A)}
    assert verdict(0, apis)["trusted"]
    liar = verdict(1, apis)
    assert not liar["trusted"]
    assert verdict(1, apis, history={"sharpness": [1.0] * 9, "agreement": [1.0] * 9})["trusted"]


def test_the_reverse_check_reads_the_memory_images_another_api_recovered():
    judge_images, labels = images_of(A, 4)
    memory = TaskMemory(image_size=SIZE)
    memory.add(judge_images, torch.as_tensor(A)[labels], owner="demo/conv4/1")
    apis = {"a": ReadsTheClass(A, answers_for=B), "judge": ReadsTheClass(A)}
    v = verdict(0, apis, memory=memory)
    assert v["evidence"] == 10 and not v["trusted"]       # a forward and a reverse term per class
    assert verdict(0, {"a": ReadsTheClass(A), "judge": ReadsTheClass(A)}, memory=memory)["evidence"] == 10


@pytest.mark.slow
def test_the_judge_works_on_api_sh_and_mh_pools(tmp_path):
    """Judges of other architectures and image sizes (MH: 84px images for 32px APIs, classes moved)."""
    from methods.kd import api_probs
    from synthesis.recover import recover
    prefix = str(tmp_path)
    for d in ("cifar100", "miniimagenet", "cub"):
        for arch in ("conv4", "resnet10", "resnet18"):
            save_fake_api(prefix, d, arch, 0, range(5))
    cfg = Config(dataset="mix", pre_backbone="mix", num_sup_kd=2, api_trust="agree", ZO=True, q=2, numsplit=1,
                 generate_iterations=1)
    pool = APIPool.load(prefix, "mix", "mix", 5, 1, "cpu", say=lambda m: None)
    memory = TaskMemory(image_size=84)
    for entry in pool.apis:
        api = pool.open(entry)
        judge = make_judge(pool, memory, entry, [], {}, cfg, task_id=3)
        x, y = recover(api, cfg.num_sup_kd, cfg, generator=torch.Generator().manual_seed(0), image_size=84)
        v = judge(api, x, y, api_probs(api, F.interpolate(x, size=api.spec.image_size)))
        assert v["evidence"] >= 5 and len(v["judges"]) == 2
        assert all(j.split("/")[0] == entry.dataset and j != entry.name for j in v["judges"])
        memory.add(x, torch.as_tensor(api.classes)[y], owner=entry.name)
    assert memory.owned_by(pool.apis[0].name)


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def lying_pool(demo_pool, tmp_path_factory) -> str:
    """The demo pool plus an API 3 that claims API 0's classes and answers with API 2's network (trained on
    other classes), and the truth file beside it."""
    out = str(tmp_path_factory.mktemp("lying"))
    folder = "demo/conv4/meta_train/5way/model"
    os.makedirs(os.path.join(out, folder))
    api = [load_checkpoint(os.path.join(demo_pool, folder, f"model_specific_{i}.pth")) for i in range(3)]
    for i, ck in enumerate(api):
        torch.save(ck, os.path.join(out, folder, f"model_specific_{i}.pth"))
    torch.save({**api[0], "index": 3, "state_dict": api[2]["state_dict"]}, os.path.join(out, folder, "model_specific_3.pth"))
    with open(os.path.join(out, TRUTH_FILE), "w") as f:
        json.dump({"apis": [{"api": "demo/conv4/3", "kind": "labels"}]}, f)
    return out


# Stronger recovery than the tiny run's, so that recovered images carry their class; every visit a new API.
JUDGED = ["--APInum", "4", "--q", "10", "--generate_iterations", "20", "--num_sup_kd", "10", "--generate_interval", "1",
          "--episode_train", "16", "--val_interval", "16", "--save_interval", "8", "--api_trust", "agree"]

# Runs main.py with an audit hook that fails the run if it opens the truth file.
NEVER_OPENS = ("import runpy, sys\n"
               "def hook(event, args):\n"
               "    if event == 'open' and isinstance(args[0], str) and '" + TRUTH_FILE + "' in args[0]:\n"
               "        raise SystemExit('the truth file was opened: ' + args[0])\n"
               "sys.addaudithook(hook)\n"
               "sys.argv = ['main.py'] + sys.argv[1:]\n"
               "runpy.run_path('main.py', run_name='__main__')\n")


@pytest.mark.slow
def test_a_permuted_label_api_is_flagged_never_drawn_again_and_the_truth_is_never_read(demo_root, lying_pool,
                                                                                        tmp_path):
    out = str(tmp_path / "run")
    run_cli(["-c", NEVER_OPENS, *flags(demo_root, lying_pool, out, *JUDGED)])
    records = [r["trust"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "trust" in r]
    by_api = {}
    for r in records:
        by_api.setdefault(r["api"], []).append(r)
    assert "demo/conv4/3" in by_api, f"the lying API was never drawn: {list(by_api)}"
    assert all(r["trusted"] for api, rs in by_api.items() if api != "demo/conv4/3" for r in rs)
    flagged = [r["task"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
               if "trust" in r and r["trust"]["api"] == "demo/conv4/3" and not r["trust"]["trusted"]]
    assert flagged and "demo/conv4/0" in by_api["demo/conv4/3"][0]["judges"]
    later = [r["task"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
             if "trust" in r and r["trust"]["api"] == "demo/conv4/3" and (r["task"] - 1) // 4 > (flagged[0] - 1) // 4]
    assert not later, "a distrusted API was drawn again"     # (visits planned in the same meta-batch may run)
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert ck["state"]["distrusted"] == ["demo/conv4/3"]
    assert "demo/conv4/3" not in ck["memory"]["owners"].values() and ck["memory"]["owners"]  # nothing of it kept


@pytest.mark.slow
def test_a_run_that_trusts_every_api_is_the_undefended_run(demo_root, demo_pool, tmp_path, monkeypatch):
    from main import parse_args
    from methods import trust
    from methods.meta_train import train
    monkeypatch.setattr(trust, "SHARPNESS_MIN", -2.0)
    monkeypatch.setattr(trust, "AGREEMENT_MIN", -2.0)
    off = train(parse_args(flags(demo_root, demo_pool, str(tmp_path / "off"), "--episode_train", "16",
                                 "--val_interval", "8")))
    on = train(parse_args(flags(demo_root, demo_pool, str(tmp_path / "on"), "--episode_train", "16",
                                "--val_interval", "8", "--api_trust", "agree")))
    assert on["test_acc"] == off["test_acc"] and on["api_visits"] == off["api_visits"]
    assert on["api_queries"] > off["api_queries"]           # the judges' queries, counted
    a, b = (torch.load(os.path.join(str(tmp_path / d), "last.pth"), weights_only=True) for d in ("off", "on"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    trusted = [r["trust"]["trusted"] for r in read_jsonl(str(tmp_path / "on" / "metrics.jsonl")) if "trust" in r]
    assert trusted and all(trusted)


@pytest.mark.slow
def test_two_processes_judge_as_one(demo_root, lying_pool, tmp_path):
    """Under torchrun the verdicts, the distrusted APIs, the memory and the model are those of one process."""
    from test_dist import SAME_THREADS, TORCHRUN
    outs = {}
    for n, launch in ((1, ["main.py"]), (2, [*TORCHRUN, "main.py"])):
        outs[n] = str(tmp_path / f"p{n}")
        run_cli([*launch, *flags(demo_root, lying_pool, outs[n], "--APInum", "4", "--api_trust", "agree",
                                 "--generate_interval", "1", "--episode_train", "16", "--val_interval", "16")],
                env_extra=SAME_THREADS)
    trust = {n: [r for r in read_jsonl(os.path.join(o, "metrics.jsonl")) if "trust" in r] for n, o in outs.items()}
    assert trust[1] and trust[1] == trust[2]
    a, b = (torch.load(os.path.join(o, "last.pth"), weights_only=True) for o in outs.values())
    assert a["state"]["distrusted"] == b["state"]["distrusted"] and a["memory"]["owners"] == b["memory"]["owners"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
