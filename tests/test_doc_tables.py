"""The tables and figures of README.md, docs/*.md and bench/RESULTS.md are those of results/*.json
(`python -m reporting.tables --check`, run in-process here; reporting/tables.py needs no torch)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from reporting import tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_table_agrees_with_its_result_file():
    problems = tables.check(REPO)
    assert not problems, "\n\n".join(problems) + f"\n\nrun `{tables.FIX}` (after editing results/, not the page)"


def test_every_marker_names_a_generator_and_every_result_file_is_used():
    used = set()
    for page in tables.pages(REPO):
        text = open(os.path.join(REPO, page), encoding="utf-8").read()
        used |= {m.group(2) for m in tables.OPEN.finditer(text)}
    assert used <= set(tables.GENERATORS)
    sources = {tables.GENERATORS[name][0] for name in used}
    # difficulty.json waits for its marker in docs/datasets.md; its table is already the page's, verbatim
    assert sources | {"difficulty"} == set(tables.load(REPO))
    assert tables.difficulty(tables.load(REPO)) in open(os.path.join(REPO, "docs", "datasets.md")).read()


@pytest.fixture
def copy(tmp_path):
    """README.md, docs/differences.md and results/ in a temporary root."""
    shutil.copytree(os.path.join(REPO, "results"), tmp_path / "results")
    (tmp_path / "docs").mkdir()
    for page in ("README.md", "docs/differences.md"):
        shutil.copy(os.path.join(REPO, page), tmp_path / page)
    return tmp_path


def test_check_reports_a_changed_figure_and_writing_restores_it(copy):
    assert tables.check(str(copy)) == []
    readme = copy / "README.md"
    original = readme.read_text()
    assert "| 31.16 ± 0.66 |" in original
    readme.write_text(original.replace("| 31.16 ± 0.66 |", "| 31.17 ± 0.66 |"))
    problems = tables.check(str(copy))
    assert any(p.startswith("README.md: table 'demo' differs from results/demo.json") and "31.16 ± 0.66" in p
               for p in problems), problems
    assert tables.write(str(copy)) == ["README.md"]
    assert readme.read_text() == original and tables.check(str(copy)) == []


def test_check_reports_a_result_file_the_pages_do_not_follow(copy):
    path = copy / "results" / "ablation.json"
    ablation = json.loads(path.read_text())
    ablation["rows"][0]["acc"] = 30.00          # the faithful row: every "vs faithful" and a phrase move with it
    path.write_text(json.dumps(ablation))
    problems = tables.check(str(copy))
    names = {p.splitlines()[0].split(": ", 1)[1] for p in problems if "differs from" in p}
    assert {"table 'ablation' differs from results/ablation.json",
            "text 'ablation-switch-range' differs from results/ablation.json"} <= names, problems
    tables.write(str(copy))
    page = (copy / "docs" / "differences.md").read_text()
    assert "| faithful | (defaults) | (defaults) | 30.00 ± 0.55 | — |" in page
    assert "| no_kd_augment | `--no-kd_augment` | (defaults) | 31.74 ± 0.65 | +1.74 (CIs apart) |" in page


def test_check_reports_a_hand_typed_figure_no_result_holds_and_broken_markers(copy):
    readme = copy / "README.md"
    readme.write_text(readme.read_text() + "\nThe faithful row once read 32.63 ± 0.65.\n")
    assert [p for p in tables.check(str(copy)) if "32.63 ± 0.65 is in no file of results/" in p]
    readme.write_text("<!-- table: nonesuch -->\n<!-- /table -->\n")
    assert "no generator named 'nonesuch'" in tables.check(str(copy))[0]
    readme.write_text("<!-- text: demo-gap -->40%<!-- /text -->\n")     # would start an HTML block
    assert "starts a line" in tables.check(str(copy))[0]
    readme.write_text("<!-- table: demo -->\n")
    assert "has no <!-- /table -->" in tables.check(str(copy))[0]


def test_derived_figures():
    # gap closed = (method - random init) / (real - random init), rounded to a whole percent
    assert tables.percent(tables.gap_closed(31.16, 25.33, 39.74)) == "40%"      # README, faithful
    assert tables.percent(tables.gap_closed(37.07, 26.86, 44.19)) == "59%"      # README, improved
    assert tables.percent(tables.gap_closed(30.46, 25.34, 40.47)) == "34%"      # the ablation's code
    assert tables.percent(tables.gap_closed(37.04, 26.86, 46.05)) == "53%"
    assert tables.gap_closed(30, 20, 40) == 0.5 and tables.percent(0.125) == "13%"
    # 95% intervals apart: |a - b| > ci_a + ci_b; touching intervals overlap
    assert tables.apart(31.74, 0.65, 30.46, 0.55)          # +1.28 against 1.20
    assert tables.apart(31.72, 0.60, 30.46, 0.55)          # +1.26 against 1.15
    assert not tables.apart(31.14, 0.59, 30.46, 0.55)      # +0.68 against 1.14
    assert not tables.apart(31.0, 0.5, 30.0, 0.5) and not tables.apart(30.0, 0.5, 31.0, 0.5)
    assert tables.apart(31.01, 0.5, 30.0, 0.5)
    base = {"acc": 30.46, "ci": 0.55}
    assert tables.vs({"acc": 31.40, "ci": 0.62}, base) == "+0.94"
    assert tables.vs({"acc": 37.04, "ci": 0.71}, base) == "+6.58 (CIs apart)"
    assert tables.vs({"acc": 29.00, "ci": 0.50}, base) == "-1.46 (CIs apart)"
    assert tables.ratio(756900, 68000) == "1/11.1" and tables.ratio(925100, 85000) == "1/10.9"


def test_the_demo_sentences_follow_the_intervals():
    R = tables.load(REPO)
    assert "non-overlapping intervals in every column" in tables.demo_summary(R)
    run = R["demo"]["recipes"]["improved"]
    tables.demo_cell(run, "random_init", 5)["acc"] = 50.0                 # now within BiDf-MKD's interval
    assert "in faithful 1-shot, faithful 5-shot, improved 1-shot (not in improved 5-shot)" in tables.demo_summary(R)
    assert tables.demo_apart(R).endswith("(not in improved 5-shot)")


def _fake_demo_run(root):
    rows = [{"method": m, "shot": s, "acc": a, "ci": c, "tasks": 600} for m, s, a, c in (
        ("random_init", 1, 25.0, 0.5), ("random_init", 5, 30.0, 0.5), ("bidf_mkd", 1, 33.0, 0.6),
        ("bidf_mkd", 5, 42.0, 0.7), ("maml_real", 1, 41.0, 0.7), ("maml_real", 5, 47.0, 0.7))]
    root.mkdir()
    (root / "results.json").write_text(json.dumps({"rows": rows, "api_queries": 1009200, "api_visits": 12,
                                                   "wall_seconds": 500.4, "stage_seconds": {}}))


def test_import_demo_replaces_one_recipe_and_the_pages_follow(copy, tmp_path):
    _fake_demo_run(tmp_path / "demo-run")
    entry = tables.import_demo(str(tmp_path / "demo-run"), "faithful", "a test machine", date="2030-01-02",
                               commit="abc1234", root=str(copy))
    assert entry["api_visits"] == 12 and entry["test_tasks"] == 600 and entry["kernels"] == "the machine's own kernels"
    demo = json.loads((copy / "results" / "demo.json").read_text())
    assert demo["recipes"]["faithful"]["machine"] == "a test machine"
    assert demo["recipes"]["improved"]["api_visits"] == 13                 # the other recipe is kept
    assert any("table 'demo' differs" in p for p in tables.check(str(copy)))
    tables.write(str(copy))
    readme = (copy / "README.md").read_text()
    assert "| BiDf-MKD (black-box, zero-order) | 33.00 ± 0.60 | 42.00 ± 0.70 | 37.07 ± 0.73 | 50.51 ± 0.72 |" in readme
    assert "The faithful default was measured on 2030-01-02 on a test machine" in readme
    assert "faithful: 12 API visits, 1,009,200 queries" in readme and "closes 50% of the gap" in readme
    assert tables.check(str(copy)) == []


def test_import_demo_refuses_an_unfinished_run(copy, tmp_path):
    run = tmp_path / "half"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"rows": [], "api_queries": None}))
    with pytest.raises(SystemExit, match="not a finished demo"):
        tables.import_demo(str(run), "improved", "m", root=str(copy))


def test_the_command_needs_no_torch_and_check_exits_1_with_the_fix(copy):
    (copy / "README.md").write_text((copy / "README.md").read_text().replace("| 39.74 ± 0.71 |", "| 39.75 ± 0.71 |"))
    code = ("import runpy, sys; sys.argv = ['tables', '--check', '--root', sys.argv[1]]\n"
            "try: runpy.run_module('reporting.tables', run_name='__main__')\n"
            "except SystemExit as e: assert 'torch' not in sys.modules, 'torch imported'; raise")
    proc = subprocess.run([sys.executable, "-c", code, str(copy)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "README.md: table 'demo' differs from results/demo.json" in proc.stdout
    assert "run `python -m reporting.tables`" in proc.stdout
