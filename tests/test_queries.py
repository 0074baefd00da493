"""The accuracy-versus-queries curve (bench/queries.py): rows, budgets, skipping finished rows, outputs."""
import json
import os

import bench.queries as bq


def test_every_row_names_known_flags():
    from main import parse_args
    for name, (method, flags, share) in bq.ROWS.items():
        cfg = parse_args(["--preset", "demo", *flags, *(["--query_budget", "1000000"] if share else [])])
        assert cfg.meta_generator == ("--meta_generator" in flags)
        assert share in (None, bq.ONE_VISIT) or 0 < share < 1


def _write(d, obj):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(obj, f)


def test_finished_rows_are_skipped_and_the_outputs_written(tmp_path, monkeypatch):
    out, demo = tmp_path / "q", tmp_path / "demo"
    for i, name in enumerate(bq.ROWS):
        _write(str(out / name), {"api_queries": 1000 * (i + 1), "api_visits": i + 1, "wall_seconds": 9.0})
        _write(str(out / "eval" / name), {"test_acc": 30.0 + i, "test_ci": 0.5})
    _write(str(demo / "eval" / "random_init_1shot"), {"test_acc": 25.0, "test_ci": 0.4})
    _write(str(demo / "eval" / "maml_real_1shot"), {"test_acc": 40.0, "test_ci": 0.7})
    ran = []

    def fake_run(cmd, log, threads):
        assert cmd[0] in ("-m", "pretrain.py"), f"a finished row ran again: {cmd}"
        ran.append(cmd[:2])
    monkeypatch.setattr(bq, "_run", fake_run)
    rows = bq.main(["--out", str(out), "--demo_dir", str(demo), "--test_tasks", "600"])
    assert len(ran) == 2 and [r["row"] for r in rows] == list(bq.ROWS)
    res = json.load(open(out / "results.json"))
    assert {"method", "queries", "acc", "ci"} <= set(res["rows"][0])
    assert res["rows"][1]["budget"] == 1000 // 3                       # a share of paper_full's queries
    assert res["baselines"]["MAML on real data"] == {"acc": 40.0, "ci": 0.7}
    assert os.path.getsize(out / "figs" / "accuracy_vs_queries.png") > 1000
    assert res["rows"][2]["budget"] == 100 * (40 * 21 + 1)             # one paper visit at the demo scale
    assert "| paper_1_visit |" in open(out / "results.md").read()
