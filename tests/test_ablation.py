"""The ablation's table: rows, deltas and the CIs-apart mark (bench/ablation.py)."""
from bench.ablation import ROWS, markdown
from core.config import RECIPES


def test_every_row_names_known_flags_and_the_improved_recipe_is_a_row():
    from main import parse_args
    for name, (flags, pool) in ROWS.items():
        parse_args(["--preset", "demo", *flags])        # raises on an unknown flag or value
        assert pool in ("faithful", "api_augment")
    assert ROWS["improved"][0] == ["--recipe", "improved"] and RECIPES["improved"]


def test_table_marks_rows_whose_intervals_do_not_overlap():
    rows = [dict(row="faithful", flags="", pool="(defaults)", acc=30.0, ci=0.5, api_queries=10, api_visits=1, train_seconds=5),
            dict(row="a", flags="--x", pool="(defaults)", acc=31.0, ci=0.6, api_queries=10, api_visits=1, train_seconds=5),
            dict(row="b", flags="--y", pool="(defaults)", acc=31.2, ci=0.6, api_queries=10, api_visits=1, train_seconds=5)]
    meta = dict(test_tasks=600, date="d", processor="p", jobs=2, command="c")
    lines = markdown(rows, meta).splitlines()
    assert "+1.00 |" in lines[3] and "CIs apart" not in lines[3]        # 1.0 < 0.5 + 0.6
    assert "+1.20 (CIs apart)" in lines[4]                              # 1.2 > 1.1
