"""experiments/ as a user runs them (commands only: tests import no experiment): every row of the ablation
and of the queries curve is a valid main.py command line, and unknown rows are refused."""
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
