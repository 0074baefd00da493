"""main.py --evaluate (how the demo scores saved models) and the demo's results table and pictures."""
import json
import os

import torch

from conftest import run_cli
from network import build


def _evaluate(demo_root, out, checkpoint, *extra):
    return run_cli(["main.py", "--dataset", "demo", "--data_root", demo_root, "--evaluate", checkpoint,
                    "--num_sup_test", "1", "--num_qur_test", "3", "--episode_test", "8",
                    "--test_inner_update_num", "2", "--out_dir", out, *extra], check=False)


def test_evaluate_scores_the_saved_weights(demo_root, tmp_path):
    # An all-zero meta model outputs equal logits before and after adaptation (every gradient but the
    # head bias's is zero, and 1-shot balanced supports cancel that one), so argmax is class 0 on every
    # query: exactly 1/5 of a 5-way task. Random weights would not give exactly 20.0 with zero spread.
    model = build("conv4", 5, image_size=32, batch_stats=True)
    torch.save({"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}, tmp_path / "zero.pth")
    proc = _evaluate(demo_root, str(tmp_path / "ev"), str(tmp_path / "zero.pth"))
    assert proc.returncode == 0, proc.stderr
    summary = json.load(open(tmp_path / "ev" / "summary.json"))
    assert abs(summary["test_acc"] - 20.0) < 1e-4 and summary["test_ci"] < 1e-4
    assert summary["episode_test"] == 8 and summary["num_sup_test"] == 1
    rows = [json.loads(line) for line in open(tmp_path / "ev" / "metrics.jsonl")]
    assert [r["split"] for r in rows] == ["meta_test"]          # selection already happened on meta_val


def test_evaluate_random_is_reproducible_and_bad_checkpoints_fail_in_one_line(demo_root, tmp_path):
    a = _evaluate(demo_root, str(tmp_path / "a"), "random", "--seed", "3")
    b = _evaluate(demo_root, str(tmp_path / "b"), "random", "--seed", "3")
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    acc = [json.load(open(tmp_path / d / "summary.json"))["test_acc"] for d in "ab"]
    assert acc[0] == acc[1] and 0 <= acc[0] <= 100
    missing = _evaluate(demo_root, str(tmp_path / "c"), str(tmp_path / "none.pth"))
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        f"error: --evaluate {tmp_path / 'none.pth'}: no such checkpoint; pass a run's best.pth or last.pth"]
    torch.save({"model": build("conv4", 7, image_size=32, batch_stats=True).state_dict()}, tmp_path / "w7.pth")
    wrong = _evaluate(demo_root, str(tmp_path / "d"), str(tmp_path / "w7.pth"))
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode != 0 and len(lines) == 1 and "not a meta-model checkpoint of this geometry" in lines[0]


def _fake_demo(root):
    """A demo directory as scriptskd/demo.sh leaves it, with made-up figures."""
    figures = {("random_init", 1): (27.0, 0.9), ("random_init", 5): (38.0, 1.0), ("bidf_mkd", 1): (33.0, 1.0),
               ("bidf_mkd", 5): (45.0, 1.1), ("maml_real", 1): (40.0, 1.2), ("maml_real", 5): (55.0, 1.0)}
    for (method, shot), (acc, ci) in figures.items():
        d = root / "eval" / f"{method}_{shot}shot"
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"test_acc": acc, "test_ci": ci, "episode_test": 600}))
    for method in ("bidf_mkd", "maml_real"):
        d = root / method
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"dataset": "demo"}))
        (d / "summary.json").write_text(json.dumps({"api_queries": 1234, "api_visits": 3, "tasks": 400}))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"task": t, "meta_iter": t // 4, "split": s, "dataset": "demo", "acc": 30 + t / 100,
                        "ci": 1.0}) + "\n" for t in (100, 200) for s in ("meta_val", "meta_test")))
    (root / "timing.json").write_text(json.dumps({"total": 800, "stages": {"bidf_mkd": 400}}))
    return figures


def test_reporting_writes_the_table_and_the_pictures(tmp_path):
    figures = _fake_demo(tmp_path)
    run_cli(["-m", "reporting", str(tmp_path)])
    res = json.load(open(tmp_path / "results.json"))
    got = {(r["method"], r["shot"]): (r["acc"], r["ci"]) for r in res["rows"]}
    assert got == figures
    assert res["api_queries"] == 1234 and res["wall_seconds"] == 800
    md = open(tmp_path / "results.md").read()
    assert "| BiDf-MKD (black-box, ZO) | 33.00 ± 1.00 | 45.00 ± 1.10 |" in md
    assert os.path.getsize(tmp_path / "figs" / "accuracy.png") > 10_000


def test_overlap_of_confidence_intervals():
    from reporting.results import overlap
    rows = [{"method": "a", "shot": 1, "acc": 30.0, "ci": 1.0}, {"method": "b", "shot": 1, "acc": 32.5, "ci": 1.0},
            {"method": "c", "shot": 1, "acc": 31.5, "ci": 1.0}]
    assert overlap(rows, "a", "b", 1) is False and overlap(rows, "a", "c", 1) is True
    assert overlap(rows, "a", "b", 5) is None
