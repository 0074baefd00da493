"""The tables and figures of README.md, docs/*.md and bench/RESULTS.md are those of results/*.json:
`python -m experiments.tables --check` (run as a command: tests import no experiment), its figures derived
the same way every time, and its rewrite restoring what an edit changed."""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.fast
FIX = "python -m experiments.tables"


def tables(*args, root=None) -> subprocess.CompletedProcess:
    """The command, in a child process that must not load torch (it renders text from JSON)."""
    code = ("import runpy, sys; sys.argv = ['tables', *sys.argv[1:]]\n"
            "try: runpy.run_module('experiments.tables', run_name='__main__')\n"
            "except SystemExit as e: assert 'torch' not in sys.modules, 'torch imported'; raise")
    extra = ["--root", str(root)] if root is not None else []
    return subprocess.run([sys.executable, "-c", code, *args, *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def test_every_table_agrees_with_its_result_file():
    proc = tables("--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr + f"\n\nrun `{FIX}` (after editing results/, not the page)"


@pytest.fixture
def copy(tmp_path):
    """README.md, docs/differences.md and results/ in a temporary root."""
    shutil.copytree(os.path.join(REPO, "results"), tmp_path / "results")
    (tmp_path / "docs").mkdir()
    for page in ("README.md", "docs/differences.md"):
        shutil.copy(os.path.join(REPO, page), tmp_path / page)
    return tmp_path


def test_check_reports_a_changed_figure_with_the_fix_and_writing_restores_it(copy):
    assert tables("--check", root=copy).returncode == 0
    readme = copy / "README.md"
    original = readme.read_text()
    faithful = json.loads((copy / "results" / "demo.json").read_text())["recipes"]["faithful"]
    cell = next(f"| {r['acc']:.2f} ± {r['ci']:.2f} |" for r in faithful["rows"]
                if (r["method"], r["shot"]) == ("bidf_mkd", 1))
    assert cell in original
    readme.write_text(original.replace(cell, cell.replace(" ±", "1 ±", 1)))
    proc = tables("--check", root=copy)
    assert proc.returncode == 1 and "README.md: table 'demo' differs from results/demo.json" in proc.stdout
    assert f"run `{FIX}`" in proc.stdout
    assert tables(root=copy).returncode == 0
    assert readme.read_text() == original and tables("--check", root=copy).returncode == 0


def test_a_changed_result_moves_every_figure_derived_from_it(copy):
    path = copy / "results" / "ablation.json"
    ablation = json.loads(path.read_text())
    base = next(r for r in ablation["rows"] if r["row"] == "faithful")
    other = next(r for r in ablation["rows"] if r["row"] == "no_kd_augment")
    base["acc"] = round(other["acc"] - 1.0, 2)           # "vs faithful" is now +1.00 for that row,
    assert 1.0 < base["ci"] + other["ci"]                # less than the two half-widths: the intervals overlap
    path.write_text(json.dumps(ablation))
    proc = tables("--check", root=copy)
    assert proc.returncode == 1
    assert "table 'ablation' differs from results/ablation.json" in proc.stdout
    tables(root=copy)       # (it then names the prose figures of the old faithful row: typed by hand there)
    page = (copy / "docs" / "differences.md").read_text()
    row = next(li for li in page.splitlines() if li.startswith("| no_kd_augment |"))
    assert f"| {other['acc']:.2f} ± {other['ci']:.2f} | +1.00 |" in row       # not "(CIs apart)"
    assert f"| {base['acc']:.2f} ± {base['ci']:.2f} | — |" in page
    assert "differs from" not in tables("--check", root=copy).stdout


def test_a_hand_typed_figure_and_broken_markers_fail_the_check(copy):
    readme = copy / "README.md"
    readme.write_text(readme.read_text() + "\nThe faithful row once read 32.63 ± 0.65.\n")
    assert "32.63 ± 0.65 is in no file of results/" in tables("--check", root=copy).stdout
    for text, message in (("<!-- table: nonesuch -->\n<!-- /table -->\n", "no generator named 'nonesuch'"),
                          ("<!-- text: demo-gap -->40%<!-- /text -->\n", "starts a line"),
                          ("<!-- table: demo -->\n", "has no <!-- /table -->")):
        readme.write_text(text)
        proc = tables("--check", root=copy)
        assert proc.returncode == 1 and message in proc.stdout + proc.stderr, (text, proc.stdout, proc.stderr)


def _fake_demo_run(root, bidf_1shot=33.0):
    rows = [{"method": m, "shot": s, "acc": a, "ci": c, "tasks": 600} for m, s, a, c in (
        ("random_init", 1, 25.0, 0.5), ("random_init", 5, 30.0, 0.5), ("bidf_mkd", 1, bidf_1shot, 0.6),
        ("bidf_mkd", 5, 42.0, 0.7), ("maml_real", 1, 41.0, 0.7), ("maml_real", 5, 47.0, 0.7))]
    root.mkdir()
    (root / "results.json").write_text(json.dumps({"rows": rows, "api_queries": 1009200, "api_visits": 12,
                                                   "wall_seconds": 500.4, "stage_seconds": {}}))


def test_import_demo_replaces_one_recipe_and_the_derived_sentences_follow(copy, tmp_path):
    _fake_demo_run(tmp_path / "demo-run")
    improved = json.loads((copy / "results" / "demo.json").read_text())["recipes"]["improved"]
    proc = tables("--import-demo", str(tmp_path / "demo-run"), "--recipe", "faithful", "--machine", "a test machine",
                  "--date", "2030-01-02", "--commit", "abc1234", root=copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    demo = json.loads((copy / "results" / "demo.json").read_text())
    assert demo["recipes"]["faithful"]["machine"] == "a test machine"
    assert demo["recipes"]["faithful"]["api_visits"] == 12 and demo["recipes"]["improved"] == improved  # untouched
    readme = (copy / "README.md").read_text()
    assert "| BiDf-MKD (black-box, zero-order) | 33.00 ± 0.60 | 42.00 ± 0.70 |" in readme
    assert "The faithful default was measured on 2030-01-02 on a test machine" in readme
    # gap closed = (33 - 25) / (41 - 25) = 50%; every faithful column apart from random init
    assert "faithful: 12 API visits, 1,009,200 queries" in readme and "closes 50% of the gap" in readme
    assert tables("--check", root=copy).returncode == 0


def test_the_summary_names_a_column_whose_intervals_overlap(copy, tmp_path):
    _fake_demo_run(tmp_path / "demo-run", bidf_1shot=25.9)          # 0.9 < 0.5 + 0.6: overlaps random init
    tables("--import-demo", str(tmp_path / "demo-run"), "--recipe", "faithful", "--machine", "m", root=copy)
    readme = (copy / "README.md").read_text()
    assert "(not in faithful 1-shot)" in readme and "closes 6% of the gap" in readme   # 0.9 / 16


def test_import_demo_refuses_an_unfinished_run(copy, tmp_path):
    run = tmp_path / "half"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"rows": [], "api_queries": None}))
    proc = tables("--import-demo", str(run), "--recipe", "improved", "--machine", "m", root=copy)
    assert proc.returncode != 0 and "not a finished demo" in proc.stdout + proc.stderr
