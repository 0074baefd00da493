"""reporting/ (python -m reporting): the demo's results table and pictures, the intervals-apart rule, and the
recovered images it reads from a run's last.pth. (main.py --evaluate, which scores the demo's models:
test_meta_train.py; the generated tables of the docs: test_doc_tables.py; docs/options.md: test_config.py.)"""
import json
import os

import pytest
import torch

from conftest import run_cli
from helpers import run_memory

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow


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


@pytest.mark.slow
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


def test_last_pth_keeps_what_reporting_reads(tiny_run, tmp_path):
    """python -m reporting draws recovered images from last.pth: the first images of each class."""
    from reporting.figures import recovered_vs_real
    out = tiny_run[0]
    ck = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    mem = run_memory(out)
    assert set(ck["memory"]["store"]) == set(mem.classes)
    for c in mem.classes:
        assert torch.equal(torch.cat(list(ck["memory"]["store"][c]))[:6], torch.cat(mem.batches(c))[:6])
    assert recovered_vs_real(out, str(tmp_path / "recovered.png"))
    assert os.path.getsize(tmp_path / "recovered.png") > 1000


def test_the_three_seed_queries_figure_is_drawn_from_results(tmp_path):
    """python -m experiments.queries --seeds_figure: a picture from results/queries.json's three-seed rows."""
    from experiments.queries import main as queries_main
    out = tmp_path / "seeds.png"
    assert queries_main(["--seeds_figure", str(out)]) == []
    from PIL import Image
    with Image.open(out) as im:
        assert im.size[0] > 500 and im.size[1] > 300
