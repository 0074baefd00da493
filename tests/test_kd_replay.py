"""methods/kd_replay.py (--kd_replay): a visit records the sets and answers it queried; a replay task runs a
recorded visit's bi-level KD task again, chosen from its own stream, at no query; the records survive a resume;
ρ = 0 is the run without it."""
from __future__ import annotations

import json
import os
import pytest
import torch

import methods.kd as kd
from core.config import Config
from methods import kd_replay
from methods.kd import kd_task
from methods.maml import adapt, forward, meta_params

from helpers import TINY, demo_prep, gen, meta_model, random_api

pytestmark = pytest.mark.fast

SMALL = dict(ZO=True, q=4, mu=0.005, numsplit=2, generate_iterations=2, num_sup_kd=3, num_qur_kd=2,
             inner_update_num_kd=2, inner_lr=0.01, adv=1.0)


def test_a_visit_records_what_the_api_answered_and_a_rerun_is_its_kd_task():
    api = random_api(classes=[3, 9, 11, 20, 40])
    model = meta_model()
    cfg = Config(**SMALL, kd_replay=0.5)
    asked = []
    real = kd.api_probs
    out = None
    try:
        kd.api_probs = lambda a, x: asked.append((x.detach().clone(), real(a, x))) or asked[-1][1]
        out = kd_task(model, meta_params(model), api, cfg, demo_prep(), boundary=True, generator=gen(0))
    finally:
        kd.api_probs = real
    sxa, sp, qxa, qp = out.queried
    assert torch.equal(sxa, asked[0][0]) and torch.equal(sp, asked[0][1])      # exactly the pairs queried
    assert torch.equal(qxa, asked[1][0]) and torch.equal(qp, asked[1][1])
    assert kd_task(model, meta_params(model), random_api(classes=[3, 9, 11, 20, 40]), Config(**SMALL), demo_prep(),
                   boundary=True, generator=gen(0)).queried is None                # off: nothing kept
    rec = kd_replay.VisitRecord.of("api_0", *out.queried)
    assert rec.support.dtype == torch.uint8 and (rec.support.float() / 255 - sxa).abs().max() <= 0.5 / 255 + 1e-6
    # the rerun: θ' from the recorded support set and answers, the outer loss on the recorded query set
    queries = api.queries
    loss, acc = kd_replay.kd_replay_task(model, meta_params(model), rec, cfg, demo_prep(), kd.KD_LOSSES["original"],
                                         "cpu")
    assert api.queries == queries                                            # no query
    prep = demo_prep()
    sx, qx = rec.support.float() / 255, rec.query.float() / 255
    adapted = adapt(model, meta_params(model), prep(sx), rec.support_probs, kd.original_kd_loss, 2, 0.01, way=5)
    want = kd.original_kd_loss(forward(model, adapted, prep(qx), 5), rec.query_probs)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and 0 <= acc <= 100
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_the_rerun_choice_comes_from_its_own_stream():
    cfg = Config(kd_replay=0.3, seed=5)
    picks = [kd_replay.pick(cfg, t, 7) for t in range(2000)]
    chosen = [p for p in picks if p is not None]
    assert 0.25 < len(chosen) / len(picks) < 0.35 and set(chosen) == set(range(7))
    assert picks == [kd_replay.pick(cfg, t, 7) for t in range(2000)]              # (seed, task id) alone
    assert kd_replay.pick(Config(kd_replay=0.0), 3, 7) is None and kd_replay.pick(cfg, 3, 0) is None
    assert picks != [kd_replay.pick(Config(kd_replay=0.3, seed=6), t, 7) for t in range(2000)]


def test_visit_memory_keeps_the_last_visits_drops_an_api_and_round_trips():
    mem = kd_replay.VisitMemory(keep=3)
    x, p = torch.zeros(2, 3, 4, 4), torch.full((2, 5), 0.2)
    for i in range(5):
        mem.add(kd_replay.VisitRecord.of(f"api_{i % 2}", x + i / 10, p, x, p))
    assert len(mem) == 3 and [r.api for r in mem.records] == ["api_0", "api_1", "api_0"]
    back = kd_replay.VisitMemory(keep=3)
    back.load_state_dict(mem.state_dict())
    assert [torch.equal(a.support, b.support) for a, b in zip(mem.records, back.records)] == [True] * 3
    assert mem.drop_owner("api_0") == 2 and [r.api for r in mem.records] == ["api_1"]


@pytest.mark.slow
def test_kd_replay_runs_survive_a_resume_and_rho_zero_is_the_plain_run(demo_root, demo_pool, tmp_path):
    """A run with --kd_replay stopped after task 8 and resumed ends where the uninterrupted one ends (the
    recorded visits are in last.pth); it differs from the plain run; --kd_replay 0 is the plain run."""
    def flags(out, tasks, *extra):
        return [*TINY, "--data_root", demo_root, "--pretrained_path_prefix", demo_pool, "--out_dir", out,
                "--episode_train", str(tasks), "--val_interval", "8", "--save_interval", "8", *extra]
    from main import parse_args
    from methods.meta_train import train
    d = {name: str(tmp_path / name) for name in ("whole", "part", "plain", "zero")}
    train(parse_args(flags(d["whole"], 16, "--kd_replay", "0.5")))
    train(parse_args(flags(d["part"], 8, "--kd_replay", "0.5")))
    ck8 = torch.load(os.path.join(d["part"], "last.pth"), weights_only=True)
    assert len(ck8["visits"]) == ck8["state"]["api_visits"] > 0
    cfg = json.load(open(os.path.join(d["part"], "config.json")))
    cfg["episode_train"] = 16
    json.dump(cfg, open(os.path.join(d["part"], "config.json"), "w"))
    os.remove(os.path.join(d["part"], "summary.json"))
    train(parse_args([*flags(d["part"], 16, "--kd_replay", "0.5"), "--resume"]))
    train(parse_args(flags(d["plain"], 16)))
    train(parse_args(flags(d["zero"], 16, "--kd_replay", "0")))
    ck = {k: torch.load(os.path.join(v, "last.pth"), weights_only=True) for k, v in d.items()}
    same = lambda a, b: all(torch.equal(v, ck[b]["model"][k]) for k, v in ck[a]["model"].items())   # noqa: E731
    assert same("whole", "part") and ck["whole"]["state"]["api_queries"] == ck["part"]["state"]["api_queries"]
    assert same("plain", "zero") and "visits" not in ck["zero"]
    assert not same("whole", "plain")
