"""experiments/ as a user runs them (commands only: tests import no experiment): every row of the ablation
and of the queries curve is a valid main.py command line, and unknown rows are refused; the gradient-fidelity
diagnostic runs on a one-API pool and refuses an odd q."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.fast


def _rows(module: str) -> dict:
    return json.loads(run_cli(["-m", f"experiments.{module}", "--list"]).stdout)


def test_every_ablation_row_names_known_flags_and_the_improved_recipe_is_a_row():
    from main import parse_args
    rows = _rows("ablation")
    for row in rows.values():
        parse_args(["--preset", "demo", *row["flags"]])         # raises on an unknown flag or value
    assert rows["improved"]["flags"] == ["--recipe", "improved"] and rows["faithful"]["flags"] == []
    assert parse_args(["--recipe", "improved"]).init == "torch"


def test_every_queries_row_names_known_flags_and_a_budget_below_the_full_run():
    from fractions import Fraction

    from main import parse_args
    for row in _rows("queries").values():
        cfg = parse_args(["--preset", "demo", *row["flags"], *(["--query_budget", "1000000"] if row["budget"] else [])])
        assert cfg.meta_generator == ("--meta_generator" in row["flags"])
        assert row["budget"] in (None, "one visit") or 0 < Fraction(row["budget"]) < 1


@pytest.mark.parametrize("module", ["ablation", "queries"])
def test_an_unknown_row_is_refused_before_any_work(module, tmp_path):
    proc = run_cli(["-m", f"experiments.{module}", "--rows", "nonesuch", "--out", str(tmp_path / "out")], check=False)
    assert proc.returncode != 0 and "nonesuch" in proc.stderr
    assert not (tmp_path / "out").exists()


def _random_pool(prefix) -> None:
    """A demo pool of one untrained conv4 API (no pretraining)."""
    import os

    import torch

    import network
    from synthesis.store import pool_dir
    folder = pool_dir(str(prefix), "demo", "conv4", 5)
    os.makedirs(folder)
    torch.manual_seed(0)
    m = network.build("conv4", 5, channels=3, image_size=32)
    torch.save({"state_dict": m.state_dict(), "classes": list(range(5)), "arch": "conv4", "dataset": "demo",
                "image_size": 32, "channels": 3, "way": 5, "val_acc": 50.0, "index": 0, "seed": 0, "epochs": 1},
               os.path.join(folder, "model_specific_0.pth"))


@pytest.mark.slow       # about 10 s: a subprocess that imports torch, then a recovery each way
def test_recovery_quality_compares_the_recoveries_at_equal_queries(tmp_path):
    """experiments.recovery_quality on one untrained API: a row per method at the same queries per recovery
    (the demo preset's 841 per image), shares and probabilities in range, the picture, the provenance."""
    _random_pool(tmp_path / "pool")
    out, fig = tmp_path / "rq.json", tmp_path / "rq.png"
    run_cli(["-m", "experiments.recovery_quality", "--pool", str(tmp_path / "pool"), "--apis", "0", "--per_class",
             "1", "--out", str(out), "--figure", str(fig)], env_extra={"OMP_NUM_THREADS": "1"})
    r = json.loads(out.read_text())
    assert [row["method"] for row in r["rows"]] == ["invert", "screen", "screen_textured"]
    assert {row["queries"] for row in r["rows"]} == {5 * 1 * (21 * 40)}
    assert all(0 <= row["target_acc"] <= 100 and 0 < row["confidence"] <= 1 for row in r["rows"])
    assert fig.exists() and {"date", "processor", "torch", "command", "commit"} <= set(r)


@pytest.mark.slow       # about 10 s: a subprocess that imports torch, then one 2-step recovery measured
def test_fidelity_measures_both_estimators_at_equal_queries(tmp_path):
    """experiments.fidelity on one random demo-shaped API (no pretraining), 2 steps, q 4: a row per estimator
    and q, with q + 1 queries per image per step, the same (image, step) count, and the provenance."""
    _random_pool(tmp_path / "pool")
    out = tmp_path / "fidelity.json"
    run_cli(["-m", "experiments.fidelity", "--pool", str(tmp_path / "pool"), "--apis", "0", "--seeds", "0", "--qs",
             "4", "--steps", "2", "--per_class", "1", "--out", str(out)], env_extra={"OMP_NUM_THREADS": "1"})
    r = json.loads(out.read_text())
    assert [(row["estimator"], row["q"], row["directions"], row["queries_per_image_per_step"]) for row in r["rows"]] \
        == [("forward", 4, 4, 5), ("central", 4, 2, 5)]
    for row in r["rows"]:
        assert row["cosine"]["n"] == 2 * 5 and -1 <= row["cosine"]["mean"] <= 1 and len(row["per_step_mean"]) == 2
    assert r["rows"][0]["minus_forward"] is None and 0 <= r["rows"][1]["minus_forward"]["share_higher"] <= 1
    assert {"date", "processor", "torch", "command", "commit"} <= set(r)
    assert r["white_black_loss_gap_max"] < 1e-3        # the black box and its white-box copy: one network


def test_fidelity_refuses_an_odd_q_before_any_work(tmp_path):
    proc = run_cli(["-m", "experiments.fidelity", "--qs", "20,21", "--pool", str(tmp_path / "none"),
                    "--out", str(tmp_path / "f.json")], check=False)
    assert proc.returncode != 0 and "every q even" in proc.stderr
    assert not (tmp_path / "f.json").exists() and not (tmp_path / "none").exists()
