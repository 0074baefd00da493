"""The accuracy and timing tables of README.md, docs/*.md and bench/RESULTS.md, generated from results/.

    python -m experiments.tables            rewrite every generated block from the files in results/
    python -m experiments.tables --check    change nothing; exit 1 naming each block that differs
    python -m experiments.tables --import-demo RUN_DIR --recipe faithful --machine "..."
                                          a finished demo run (its results.json, written by
                                          `python -m reporting RUN_DIR`) into results/demo.json, then rewrite

A generated block sits between two marker comments in a page: `<!-- table: NAME -->` ... `<!-- /table -->`
on lines of their own (a table, or a paragraph), or `<!-- text: NAME -->...<!-- /text -->` inside a line
(a figure or a phrase in prose). NAME is one of GENERATORS below. A result file holds measured figures
and their provenance only; what is derived from them (the gap closed, whether two 95% intervals are
apart, differences and ratios) is computed here. The check also flags any "acc ± ci" figure in the
pages that no result file holds, so a number typed by hand cannot drift from its run.

Standard library only: it must not load torch (the tests run it as a command).
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import glob
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "results"
FIX = "python -m experiments.tables"

OPEN = re.compile(r"<!-- (table|text): ([A-Za-z0-9_.-]+) -->")
FIGURE = re.compile(r"(?<![\d.])(\d+\.\d+) ± (\d+\.\d+)")
# "acc ± ci" figures that are not measurements (an example log line).
NOT_MEASURED = {("docs/outputs.md", "29.28 ± 1.45"), ("docs/outputs.md", "32.84 ± 1.63")}


# ------------------------------------------------------------------ arithmetic
def apart(a: float, ci_a: float, b: float, ci_b: float) -> bool:
    """Are the two 95% intervals a ± ci_a and b ± ci_b disjoint? (touching intervals overlap)"""
    return abs(a - b) - (ci_a + ci_b) > 1e-9


def gap_closed(method: float, random_init: float, real: float) -> float:
    """The share of the gap between random init and the real-data upper bound that a method closes."""
    return (method - random_init) / (real - random_init)


def percent(x: float) -> str:
    return f"{math.floor(100 * x + 0.5):.0f}%"


def acc(r: dict) -> str:
    return f"{r['acc']:.2f} ± {r['ci']:.2f}"


def thousands(n: int) -> str:
    return f"{n:,}"


def ratio(reference: int, n: int) -> str:
    return f"1/{reference / n:.1f}"


def vs(row: dict, base: dict) -> str:
    """A row against the baseline: the difference, and whether the intervals are apart."""
    d = row["acc"] - base["acc"]
    return f"{d:+.2f}" + (" (CIs apart)" if apart(row["acc"], row["ci"], base["acc"], base["ci"]) else "")


# ------------------------------------------------------------------ results
def load(root: str = ROOT) -> dict:
    """Every results/NAME.json, by NAME."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, RESULTS, "*.json"))):
        with open(path, encoding="utf-8") as f:
            try:
                out[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
            except json.JSONDecodeError as e:
                raise json.JSONDecodeError(f"{os.path.relpath(path, root)}: {e.msg}", e.doc, e.pos) from None
    return out


def measured_figures(res: dict) -> set:
    """Every (acc, ci) pair any result file holds, as held and to the two decimals the pages print."""
    found = set()

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("acc"), (int, float)) and isinstance(x.get("ci"), (int, float)):
                found.add((round(float(x["acc"]), 6), round(float(x["ci"]), 6)))
                found.add((round(float(x["acc"]), 2), round(float(x["ci"]), 2)))     # as a page prints it
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(res)
    return found


# ------------------------------------------------------------------ the demo (README)
DEMO_METHODS = (("random_init", "random-init meta model"),
                ("bidf_mkd", "BiDf-MKD (black-box, zero-order)"),
                ("maml_real", "MAML on the real meta-train data (upper bound)"))
RECIPES = ("faithful", "improved")
SHOTS = (1, 5)


def demo_cell(run: dict, method: str, shot: int) -> dict:
    for r in run["rows"]:
        if r["method"] == method and r["shot"] == shot:
            return r
    raise KeyError(f"results/demo.json: no {method} {shot}-shot row")


def demo_provenance(R: dict) -> str:
    recipes = R["demo"]["recipes"]
    keys = ("date", "machine", "kernels", "commit")

    def where(p):
        return f"on {p['date']} on {p['machine']} with {p['kernels']}, at commit {p['commit']}"
    f, i = recipes["faithful"], recipes["improved"]
    tasks = {r.get("test_tasks") for r in recipes.values()}
    head = (f"Both recipes were measured {where(f)}." if all(f[k] == i[k] for k in keys)
            else f"The faithful default was measured {where(f)}; the improved recipe {where(i)}.")
    return (f"{head} Meta-test accuracy (%) ± 95% CI over {' / '.join(map(str, sorted(tasks)))} tasks; "
            "chance is 20%.")


def demo_table(R: dict) -> str:
    recipes = R["demo"]["recipes"]
    lines = ["| method | faithful: 1-shot | 5-shot | improved: 1-shot | 5-shot |", "|---|---|---|---|---|"]
    for method, label in DEMO_METHODS:
        cells = [acc(demo_cell(recipes[rc], method, s)) for rc in RECIPES for s in SHOTS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _columns_apart(R: dict) -> tuple[list, list]:
    """(columns where BiDf-MKD is above random init with disjoint intervals, the other columns)."""
    yes, no = [], []
    for rc in RECIPES:
        run = R["demo"]["recipes"][rc]
        for s in SHOTS:
            b, r = demo_cell(run, "bidf_mkd", s), demo_cell(run, "random_init", s)
            ok = b["acc"] > r["acc"] and apart(b["acc"], b["ci"], r["acc"], r["ci"])
            (yes if ok else no).append(f"{rc} {s}-shot")
    return yes, no


def _demo_gap(R: dict, recipe: str, shot: int = 1) -> str:
    run = R["demo"]["recipes"][recipe]
    return percent(gap_closed(*(demo_cell(run, m, shot)["acc"] for m in ("bidf_mkd", "random_init", "maml_real"))))


def demo_summary(R: dict) -> str:
    f, i = R["demo"]["recipes"]["faithful"], R["demo"]["recipes"]["improved"]
    yes, no = _columns_apart(R)
    if not no:
        beats = "beats the untrained meta model with non-overlapping intervals in every column"
    elif yes:
        beats = (f"beats the untrained meta model with non-overlapping intervals in {', '.join(yes)} "
                 f"(not in {', '.join(no)})")
    else:
        beats = "does not beat the untrained meta model with non-overlapping intervals in any column"
    return (f"BiDf-MKD never sees a real image, only API outputs (faithful: {f['api_visits']} API visits, "
            f"{thousands(f['api_queries'])} queries; improved: {i['api_visits']} visits, "
            f"{thousands(i['api_queries'])} queries), and {beats}.\n"
            f"At 1 shot it closes {_demo_gap(R, 'faithful')} of the gap between random init and MAML on the "
            f"real data with the faithful default and {_demo_gap(R, 'improved')} with the improved recipe.")


def demo_gap(R: dict) -> str:
    return f"{_demo_gap(R, 'faithful')} (faithful) and {_demo_gap(R, 'improved')} (improved)"


def demo_faithful_1shot(R: dict) -> str:
    return acc(demo_cell(R["demo"]["recipes"]["faithful"], "bidf_mkd", 1))


def demo_visits(R: dict) -> str:
    f, i = R["demo"]["recipes"]["faithful"], R["demo"]["recipes"]["improved"]
    return (f"{f['api_visits']} black-box API visits ({thousands(f['api_queries'])} queries; "
            f"{i['api_visits']} visits and {thousands(i['api_queries'])} queries with the improved recipe)")


def demo_apart(R: dict) -> str:
    yes, no = _columns_apart(R)
    if not no:
        return "with non-overlapping 95% intervals at 1 and 5 shots, with either recipe"
    return f"with non-overlapping 95% intervals in {', '.join(yes) or 'no column'} (not in {', '.join(no)})"


def demo_kernels(R: dict) -> str:
    main = R["demo"]["recipes"]["faithful"]
    other = R["demo"]["other_kernels"][0]
    a, b = demo_cell(other, "random_init", 1)["acc"], demo_cell(main, "random_init", 1)["acc"]
    who = other["kernels"] if other["machine"] == main["machine"] else f"{other['kernels']} on {other['machine']}"
    if a == b:
        return f"{who} give the same random-init 1-shot figure, {b:.2f}"
    return f"{who} give {a:.2f} instead of {b:.2f} for the random-init 1-shot row"


def demo_other_kernels(R: dict) -> str:
    """The AVX-512 run's table in one line (bench/RESULTS.md)."""
    run = R["demo"]["other_kernels"][0]

    def cell(m, s):
        r = demo_cell(run, m, s)
        return acc(r) if r.get("ci") is not None else f"{r['acc']:.2f}"
    names = {"random_init": "random init", "bidf_mkd": "BiDf-MKD", "maml_real": "MAML"}
    return ", ".join(f"{names[m]} {cell(m, 1)} / {cell(m, 5)}" for m, _ in DEMO_METHODS) + " (1-shot / 5-shot)"


# ------------------------------------------------------------------ the ablation (docs/differences.md)
def by_row_seed(A: dict) -> dict:
    """An ablation result file's rows by (row name, seed)."""
    return {(r["row"], r["seed"]): r for r in A["rows"]}


def _ablation_base(A: dict) -> dict:
    return next(r for r in A["rows"] if r["row"] == A["baseline"])


def ablation_table(R: dict) -> str:
    A = R["ablation"]
    base = _ablation_base(A)
    lines = ["| row | main.py flags | APIs pretrained with | 5-way 1-shot (%) | vs faithful | API queries | visits "
             "| training s |", "|---|---|---|---|---|---|---|---|"]
    for r in A["rows"]:
        flags = f"`{r['flags']}`" if r["flags"] else "(defaults)"
        pool = r["pool"] if r["pool"] == "(defaults)" else f"`{r['pool']}`"
        lines.append(f"| {r['row']} | {flags} | {pool} | {acc(r)} | {'—' if r is base else vs(r, base)} | "
                     f"{thousands(r['api_queries'])} | {r['api_visits']} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def ablation_switch_range(R: dict) -> str:
    """How far each single switch other than the initialisation moves the baseline, in points."""
    A = R["ablation"]
    base = _ablation_base(A)
    d = [abs(r["acc"] - base["acc"]) for r in A["rows"] if r["kind"] == "switch" and r["row"] != "init_torch"]
    return f"{min(d):.1f} to {max(d):.1f}"


def ablation_recipes(R: dict) -> str:
    lines = ["| recipe | random init | BiDf-MKD | MAML on the real data | gap closed by BiDf-MKD |",
             "|---|---|---|---|---|"]
    for r in R["ablation"]["recipes"]["rows"]:
        b = r["bidf_mkd"]
        g = gap_closed(b["acc"], r["random_init"]["acc"], r["maml_real"]["acc"])
        lines.append(f"| {r['label']} | {acc(r['random_init'])} | {acc(b)} ({thousands(b['api_queries'])} queries) "
                     f"| {acc(r['maml_real'])} | {percent(g)} |")
    return "\n".join(lines)


def _switch_rows(A: dict) -> tuple[dict, dict]:
    """(the faithful row of each seed, {row name: its rows}, names in the file's order); the baselines' rows
    (--baseline: the ends of a recipe's gap, not switches) are left to improved_gap."""
    groups = {}
    for r in A["rows"]:
        if "--baseline" not in r["flags"]:
            groups.setdefault(r["row"], []).append(r)
    return {r["seed"]: r for r in groups["faithful"]}, groups


def ablation_switches(R: dict) -> str:
    """The faithful switches (results/ablation_switches.json): each row against the faithful row of its seed."""
    return _switch_table(R["ablation_switches"])


def ablation_additions(R: dict) -> str:
    """Additions to the paper (results/ablation_additions.json), against a faithful row of the same batch."""
    return _switch_table(R["ablation_additions"])


def ablation_additions_summary(R: dict) -> str:
    return _switch_summary(R["ablation_additions"])


def ablation_additions_means(R: dict) -> str:
    """Per addition, over the seeds it ran: the mean difference to the faithful row of the same seed, its range,
    and the mean queries against the faithful rows' mean."""
    bases, groups = _switch_rows(R["ablation_additions"])
    lines = ["| row | seeds | mean vs faithful | lowest, highest | ahead / behind (intervals apart) | "
             "mean API queries (faithful on the same seeds) |", "|---|---|---|---|---|---|"]
    for name, rows in groups.items():
        if name == "faithful":
            continue
        d = [r["acc"] - bases[r["seed"]]["acc"] for r in rows]
        sep = [x for r, x in zip(rows, d) if apart(r["acc"], r["ci"], bases[r["seed"]]["acc"], bases[r["seed"]]["ci"])]
        q = sum(r["api_queries"] for r in rows) / len(rows)
        qf = sum(bases[r["seed"]]["api_queries"] for r in rows) / len(rows)
        lines.append(f"| {name} | {len(rows)} | {sum(d) / len(d):+.2f} | {min(d):+.2f}, {max(d):+.2f} | "
                     f"{sum(x > 0 for x in sep)} / {sum(x < 0 for x in sep)} | {thousands(round(q))} "
                     f"({thousands(round(qf))}) |")
    return "\n".join(lines)


def long(name: str) -> bool:
    """A row of 800 tasks (B26): on a gap of its own length, in the replay-long table only."""
    return name.endswith("_long")


def improved_gap(R: dict) -> str:
    """The improved recipe's rows on its own random-to-real gap, per seed and as a mean over seeds, with
    their queries against the faithful row's of the same seed (results/ablation_additions.json)."""
    return _gap_table(R["ablation_additions"], lambda name: name.startswith("improved") and not long(name), "improved")


def faithful_gap(R: dict) -> str:
    """The faithful default and the screening rows on the original's initialisation, on that initialisation's
    random-to-real gap (the faithful_random_init and faithful_maml_real rows)."""
    return _gap_table(R["ablation_additions"], lambda name: name.startswith(("faithful", "screen")) and not long(name),
                      "faithful")


def _gap_table(A: dict, family, prefix: str) -> str:
    """Rows whose name `family` accepts, on the gap between rows <prefix>_random_init and <prefix>_maml_real of
    each seed: per seed the 1-shot accuracy, the share of the gap closed and the queries (the faithful row's),
    and the mean share over the seeds the row ran."""
    rows = [r for r in A["rows"] if family(r["row"])]
    low, high = f"{prefix}_random_init", f"{prefix}_maml_real"
    ends = {(r["row"], r["seed"]): r for r in rows if "--baseline" in r["flags"]}
    faithful = {r["seed"]: r for r in A["rows"] if r["row"] == "faithful"}
    seeds = sorted({s for _, s in ends if (low, s) in ends and (high, s) in ends})
    head = " | ".join(f"seed {s}: 1-shot, gap closed, queries (faithful's)" for s in seeds)
    lines = ["| row | main.py flags | " + head
             + " | mean gap closed (over the seeds run) |", "|---|---|" + "---|" * len(seeds) + "---|"]
    names = list(dict.fromkeys(r["row"] for r in rows))
    for name in names:
        mine = {r["seed"]: r for r in rows if r["row"] == name}
        cells, closed = [], []
        for s in seeds:
            if s not in mine:
                cells.append("—")
                continue
            r, lo, hi = mine[s], ends[(low, s)], ends[(high, s)]
            g = gap_closed(r["acc"], lo["acc"], hi["acc"])
            closed.append(g)
            q = ("—" if "--baseline" in r["flags"] else thousands(r["api_queries"])
                 + (f" ({thousands(faithful[s]['api_queries'])})" if s in faithful else ""))
            cells.append(f"{acc(r)}, {100 * g:.1f}%, {q}")
        if not closed:
            continue
        given = next(iter(mine.values()))["flags"]
        flags = f"`{given}`" if given else "(defaults)"
        mean = f"{100 * sum(closed) / len(closed):.1f}% ({len(closed)} seed{'s' * (len(closed) > 1)})"
        lines.append(f"| {name} | {flags} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def faithful_plus4(R: dict) -> str:
    """One line per seed with the original initialisation's gap ends: the share of that gap the faithful row
    closes, the share 4 points more would close, and the best 400-task screening row's share on that seed."""
    A = R["ablation_additions"]
    by = by_row_seed(A)
    seeds = sorted(s for (row, s) in by if row == "faithful" and ("faithful_random_init", s) in by
                   and ("faithful_maml_real", s) in by)
    parts = []
    for s in seeds:
        lo, hi, f = by[("faithful_random_init", s)]["acc"], by[("faithful_maml_real", s)]["acc"], by[("faithful", s)]
        best = max((r for (row, seed), r in by.items() if seed == s and row.startswith("screen") and not long(row)),
                   key=lambda r: r["acc"])
        parts.append(f"seed {s}: the faithful run closes {100 * gap_closed(f['acc'], lo, hi):.1f}%, 4 points more "
                     f"would close {100 * gap_closed(f['acc'] + 4, lo, hi):.1f}%, the best screening row "
                     f"(`{best['row']}`, {best['acc']:.2f}) closes {100 * gap_closed(best['acc'], lo, hi):.1f}%")
    return "; ".join(parts)


def replay_long(R: dict) -> str:
    """The faithful default and textured screening at the demo's 400 tasks and at 800 tasks with the visits
    capped (rows <name>_long), on the original's initialisation (results/ablation_additions.json)."""
    return _long_table(R["ablation_additions"], "screen_textured", ("faithful", "faithful_long"), "faithful")


def replay_long_flat(R: dict) -> str:
    """The same with flat-leaves screening (B22's prior)."""
    return _long_table(R["ablation_additions"], "screen", ("faithful", "faithful_long"), "faithful")


def replay_long_improved(R: dict) -> str:
    """The improved recipe at 400 and 800 tasks, on its own initialisation."""
    return _long_table(R["ablation_additions"], "improved", (), "improved")


def _long_table(A: dict, row: str, bases: tuple, ends: str) -> str:
    """Per seed the rows `bases`, `row` and `row`_long: 1-shot accuracy, queries and the task of the model chosen;
    `row`_long against each base; MAML on the real images at 400 and 800 tasks (<ends>_maml_real[_long]); the
    share of the gap from <ends>_random_init closed by `row` and `row`_long, each on the gap of its length."""
    by = by_row_seed(A)
    long_row = f"{row}_long"
    seeds = sorted(s for (name, s) in by if name == long_row)
    names = (*bases, row, long_row)

    def cell(name, s):
        r = by.get((name, s))
        chosen = f", model of task {r['chosen_task']}" if r is not None and "chosen_task" in r else ""
        return "—" if r is None else f"{acc(r)}, {thousands(r['api_queries'])} q{chosen}"

    def real(name, s):
        r = by.get((name, s))
        return "—" if r is None else acc(r)

    def closed(name, s, real_row):
        r, lo, hi = by.get((name, s)), by.get((f"{ends}_random_init", s)), by.get((real_row, s))
        return "—" if None in (r, lo, hi) else percent(gap_closed(r["acc"], lo["acc"], hi["acc"]))
    lines = ["| seed | " + " | ".join(f"{n} ({'800' if long(n) else '400'} tasks)" for n in names)
             + "".join(f" | {long_row} vs {b}" for b in bases)
             + f" | MAML on real images, 400 / 800 tasks | gap closed, 400 / 800 tasks ({row} / {long_row}) |",
             "|---|" + "---|" * (len(names) + len(bases) + 2)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(cell(n, s) for n in names)
                     + "".join(f" | {'—' if (b, s) not in by else vs(by[(long_row, s)], by[(b, s)])}" for b in bases)
                     + f" | {real(f'{ends}_maml_real', s)} / {real(f'{ends}_maml_real_long', s)} | "
                     f"{closed(row, s, f'{ends}_maml_real')} / {closed(long_row, s, f'{ends}_maml_real_long')} |")
    return "\n".join(lines)


def replay_long_summary(R: dict) -> str:
    """One line: per seed, screen_textured_long against the faithful default (points, intervals, queries)."""
    by = by_row_seed(R["ablation_additions"])
    seeds = sorted(s for (row, s) in by if row == "screen_textured_long" and ("faithful", s) in by)
    parts = []
    for s in seeds:
        r, f = by[("screen_textured_long", s)], by[("faithful", s)]
        sep = "intervals apart" if apart(r["acc"], r["ci"], f["acc"], f["ci"]) else "intervals overlapping"
        parts.append(f"{r['acc'] - f['acc']:+.2f} on seed {s} ({sep}; {thousands(r['api_queries'])} queries "
                     f"against {thousands(f['api_queries'])})")
    return "; ".join(parts) + ": " + replay_long_min(R)


def replay_long_min(R: dict) -> str:
    """The smallest gain of screen_textured_long over the faithful row of its seed, and the seeds run."""
    by = by_row_seed(R["ablation_additions"])
    gains = [r["acc"] - by[("faithful", s)]["acc"] for (row, s), r in by.items()
             if row == "screen_textured_long" and ("faithful", s) in by]
    return f"at least {min(gains):+.2f} points on each of the {len(gains)} seeds run"


def replay_long_seconds(R: dict) -> str:
    """The training seconds (and visits) of the 800-task textured-screening runs against the 400-task ones."""
    rows = R["ablation_additions"]["rows"]

    def span(name):
        mine = [r for r in rows if r["row"] == name]
        v = sorted({r["api_visits"] for r in mine})
        t = [r["train_seconds"] for r in mine]
        visits = f"{v[0]} visits" if len(v) == 1 else f"{v[0]} to {v[-1]} visits"
        return f"({visits}) trained in {min(t):.0f} to {max(t):.0f} s"
    return f"the 800-task screening runs {span('screen_textured_long')}, the 400-task ones {span('screen_textured')}"


def improved_gap_summary(R: dict) -> str:
    """One line: the recipe's (row `improved`) gap closed per seed, its mean, and its queries against the faithful
    rows' (results/ablation_additions.json)."""
    A = R["ablation_additions"]
    by = by_row_seed(A)
    seeds = sorted(s for (row, s) in by if row == "improved" and ("improved_random_init", s) in by
                   and ("improved_maml_real", s) in by)
    g = {s: gap_closed(by[("improved", s)]["acc"], by[("improved_random_init", s)]["acc"],
                       by[("improved_maml_real", s)]["acc"]) for s in seeds}
    def listed(items: list[str]) -> str:
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    per = listed([f"{100 * g[s]:.1f}% (seed {s})" for s in seeds])
    q = listed([thousands(by[("improved", s)]["api_queries"]) for s in seeds])
    qf = listed([thousands(by[("faithful", s)]["api_queries"]) for s in seeds])
    return (f"{per}, {100 * sum(g.values()) / len(g):.1f}% on average, on {q} queries against the faithful "
            f"runs' {qf}")


def _switch_table(A: dict) -> str:
    bases, groups = _switch_rows(A)
    lines = ["| row | main.py flags | seed | 5-way 1-shot (%) | vs faithful | API queries | visits |",
             "|---|---|---|---|---|---|---|"]
    for r in (r for rows in groups.values() for r in sorted(rows, key=lambda r: r["seed"])):
        base = bases[r["seed"]]
        flags = f"`{r['flags']}`" if r["flags"] else "(defaults)"
        lines.append(f"| {r['row']} | {flags} | {r['seed']} | {acc(r)} | {'—' if r is base else vs(r, base)} | "
                     f"{thousands(r['api_queries'])} | {r['api_visits']} |")
    return "\n".join(lines)


def ablation_switches_summary(R: dict) -> str:
    return _switch_summary(R["ablation_switches"])


def _switch_summary(A: dict) -> str:
    """Per switch: its difference to the faithful row on each seed, and on how many seeds the CIs are apart."""
    bases, groups = _switch_rows(A)
    parts = []
    for name, rows in groups.items():
        if name == "faithful":
            continue
        d = [(r, r["acc"] - bases[r["seed"]]["acc"]) for r in rows]
        sep = [x for r, x in d if apart(r["acc"], r["ci"], bases[r["seed"]]["acc"], bases[r["seed"]]["ci"])]
        up, down = sum(x > 0 for x in sep), sum(x < 0 for x in sep)
        diffs = ", ".join(f"{x:+.2f} (seed {r['seed']})" for r, x in d)
        parts.append(f"`{name}` {diffs}: ahead with intervals apart on {up} of {len(rows)} seeds"
                     + (f", behind with intervals apart on {down}" if down else ""))
    return (f"Against the faithful row of the same seed: {'; '.join(parts)}. Measured {A['date']} on "
            f"{A['processor']}, {A['jobs']} rows side by side, one thread each.")


def fidelity(R: dict) -> str:
    """Cosine of zero-order estimates to the true gradient (results/fidelity.json), per estimator and q."""
    F_ = R["fidelity"]
    lines = ["| estimator | q | directions | queries per image and step | cosine: mean (sd) | median [p25, p75] "
             "| ceiling for its directions | closer than forward on |", "|---|---|---|---|---|---|---|---|"]
    for r in F_["rows"]:
        c, m = r["cosine"], r.get("minus_forward")
        lines.append(f"| {r['estimator']} | {r['q']} | {r['directions']} | {r['queries_per_image_per_step']} | "
                     f"{c['mean']:.3f} ({c['sd']:.3f}) | {c['median']:.3f} [{c['p25']:.3f}, {c['p75']:.3f}] | "
                     f"{r['ceiling_mean']:.3f} | {percent(m['share_higher']) if m else '—'} |")
    lines += ["", f"{F_['rows'][0]['cosine']['n']} (image, step) pairs per row. Measured {F_['date']} on "
                  f"{F_['processor']}, {F_['threads']} thread(s), torch {F_['torch']}, {F_['seconds']:.0f} s; "
                  f"`{F_['command']}`."]
    return "\n".join(lines)


def fidelity_lowres(R: dict) -> str:
    """How many times closer to the true gradient the low-resolution estimates point than forward's, at the
    smallest q measured: "2.5× (8 × 8) and 3.3× (4 × 4)"."""
    rows = R["fidelity"]["rows"]
    q = min(r["q"] for r in rows)
    base = next(r for r in rows if r["q"] == q and r["estimator"] == "forward")["cosine"]["mean"]
    low = sorted((r for r in rows if r["q"] == q and r.get("resolution") in (8, 4)), key=lambda r: -r["resolution"])
    return " and ".join(f"{r['cosine']['mean'] / base:.1f}× ({r['resolution']} × {r['resolution']})" for r in low)


def recovery_quality(R: dict) -> str:
    """Inversion against screening at equal queries (results/recovery_quality.json)."""
    Q = R["recovery_quality"]
    lines = ["| recovery | queries per recovery | API assigns the image to its target | lowest over APIs "
             "| API's probability of the target |", "|---|---|---|---|---|"]
    for r in Q["rows"]:
        lines.append(f"| {r['method']} | {r['queries']:,} | {r['target_acc']:.1f}% | {r['target_acc_min']:.1f}% | "
                     f"{r['confidence']:.3f} |")
    seeds = ", ".join(map(str, Q["seeds"]))
    lines += ["", f"{Q['per_class']} images per class from each of {len(Q['apis'])} demo APIs (seed{'s' * (len(Q['seeds']) > 1)} "
                  f"{seeds}). Measured {Q['date']} on {Q['processor']}, {Q['threads']} "
                  f"thread(s), torch {Q['torch']}; `{Q['command']}`."]
    return "\n".join(lines)


def screen_target_acc(R: dict) -> str:
    """One line: "100% of the time against 63% for inversion" (results/recovery_quality.json)."""
    by = {r["method"]: r for r in R["recovery_quality"]["rows"]}
    return (f"{by['screen']['target_acc']:.0f}% of the time against {by['invert']['target_acc']:.0f}% for "
            f"inversion")


def side_by_side(R: dict) -> str:
    """The original and the faithful default end to end (results/side_by_side.json), per seed and protocol."""
    S = R["side_by_side"]
    lines = ["| implementation | seed | best meta-test evaluation (the original's protocol) | model chosen on "
             "meta_val (ours) | API visits | API queries |", "|---|---|---|---|---|---|"]
    for side, label in (("original", "original (Egg-Hu/BiDf-MKD)"), ("faithful", "this project, `--recipe faithful`")):
        for seed, r in S["runs"][side].items():
            if not r:
                continue
            po, pu = r.get("protocol_original"), r.get("protocol_ours")
            lines.append(f"| {label} | {seed} | {acc(po) if po else '—'} | {acc(pu) if pu else '—'} | "
                         f"{r['api_visits']} | {thousands(r['api_queries'])} |")
    for side in ("original", "faithful"):
        a = S["across_seeds"].get(side, {})
        cells = [f"{a[p]['mean']:.2f} (seeds {a[p]['min']:.2f} to {a[p]['max']:.2f})" if p in a else "—"
                 for p in ("protocol_original", "protocol_ours")]
        lines.append(f"| {side}: mean of the seeds | | {cells[0]} | {cells[1]} | | |")
    return "\n".join(lines)


def side_by_side_summary(R: dict) -> str:
    """Where the faithful default's seeds fall against the original's intervals (the original's protocol)."""
    S = R["side_by_side"]
    c, a = S["comparison"], S["across_seeds"]
    env = c["original_envelope_original_protocol"]
    inside = c["faithful_within_original_envelope"]["original_protocol"]
    w = c.get("welch_original_protocol")
    same = c["same_seed_intervals_overlap_original_protocol"]
    return (f"On the original's protocol the original's seeds span {env['low']:.2f} to {env['high']:.2f} (lowest "
            f"acc − CI to highest acc + CI); the faithful default's seeds lie inside on {sum(inside.values())} of "
            f"{len(inside)}, mean {a['faithful']['protocol_original']['mean']:.2f} against the original's "
            f"{a['original']['protocol_original']['mean']:.2f} (difference "
            f"{c['mean_difference_faithful_minus_original_original_protocol']:+.2f}"
            + (f", Welch t = {w['t']:.2f} on {w['df']:.1f} degrees of freedom" if w else "") + "); the two "
            f"implementations' intervals overlap for the same seed on {sum(same.values())} of {len(same)} seeds. "
            "Measured "
            f"{S['provenance']['date'][:10]} on {S['provenance']['cpu']}, one thread per run, "
            f"commit {S['provenance']['repo_commit']}.")


# ------------------------------------------------------------------ queries (docs/queries.md)
def _row(table: dict, name: str) -> dict:
    return next(r for r in table["rows"] if r["row"] == name)


def queries_curve(R: dict) -> str:
    C = R["queries"]["curve"]
    full = _row(C, C["reference"])["queries"]
    lines = ["| row | method | query budget | API queries | vs paper_full | visits | 5-way 1-shot (%) | training s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in C["rows"]:
        budget = "none" if r["budget"] is None else thousands(r["budget"])
        lines.append(f"| {r['row']} | {r['method']} | {budget} | {thousands(r['queries'])} | "
                     f"{ratio(full, r['queries'])} | {r['visits']} | {acc(r)} | {r['train_seconds']:.0f} |")
    for r in C["lines"]:
        lines.append(f"| — | {r['label']} | — | 0 | — | — | {acc(r)} | — |")
    lines += ["", f"Demo preset (`--preset {C['preset']}`, {C['tasks']} tasks), seed {C['seed']}, model chosen on "
                  f"meta_val; 5-way 1-shot meta-test accuracy ± 95% CI over {C['test_tasks']} tasks. Measured "
                  f"{C['date']} on {C['machine']}, {C['conditions']}; commit {C['commit']} (the library code of "
                  f"every row is that of {C['library_commit']}). Command: `{C['command']}`."]
    return "\n".join(lines)


def queries_rerun(R: dict) -> str:
    T = R["queries"]["rerun"]
    full = _row(T, T["reference"])["queries"]
    lines = ["| row | API queries | vs paper_full | visits | 5-way 1-shot (%) |", "|---|---|---|---|---|"]
    for r in T["rows"]:
        lines.append(f"| {r['row']} | {thousands(r['queries'])} | {ratio(full, r['queries'])} | {r['visits']} | "
                     f"{acc(r)} |")
    return "\n".join(lines)


def queries_seed2023(R: dict) -> str:
    T = R["queries"]["seed2023"]
    p, m = _row(T, "paper_full"), _row(T, "mg_1_10")
    if apart(m["acc"], m["ci"], p["acc"], p["ci"]):
        whose = "its" if m["acc"] > p["acc"] else "the paper recovery's"
        verdict = f"The intervals are apart, in {whose} favour."
    else:
        verdict = "The intervals overlap."
    return (f"the paper's recovery made {p['visits']} visits, {thousands(p['queries'])} queries, and scored "
            f"{acc(p)}; `--meta_generator` under {m['budget_share']} of that made {m['visits']} visits, "
            f"{thousands(m['queries'])} queries ({ratio(p['queries'], m['queries'])}), and scored {acc(m)}. "
            f"{verdict}")


def _seed_rows(T: dict) -> tuple[dict, dict]:
    """({seed: the paper_full row}, {row name: its rows by seed}) of results/queries.json "seeds"."""
    groups = {}
    for r in T["rows"]:
        groups.setdefault(r["row"], []).append(r)
    return {r["seed"]: r for r in groups["paper_full"]}, groups


def queries_seeds(R: dict) -> str:
    """The curve's rows on three seeds, each against the paper recovery of its seed."""
    T = R["queries"]["seeds"]
    full, groups = _seed_rows(T)
    lines = ["| row | method | seed | query budget | API queries | vs paper_full | visits | 5-way 1-shot (%) | "
             "vs paper_full |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in groups.items():
        for r in sorted(rows, key=lambda r: r["seed"]):
            p = full[r["seed"]]
            budget = "none" if r["budget"] is None else thousands(r["budget"])
            lines.append(f"| {name} | {r['method']} | {r['seed']} | {budget} | {thousands(r['queries'])} | "
                         f"{ratio(p['queries'], r['queries'])} | {r['visits']} | {acc(r)} | "
                         f"{'—' if r is p else vs(r, p)} |")
    for r in T["lines"]:
        lines.append(f"| — | {r['label']} | 2022 | — | 0 | — | — | {acc(r)} | — |")
    lines += ["", f"Demo preset, 400 tasks, model chosen on meta_val; 5-way 1-shot meta-test accuracy ± 95% CI over "
                  f"{T['test_tasks']} tasks. Measured {T['date']} on {T['processor']}, {T['conditions']}; commit "
                  f"{T['commit']}. Command: `{T['command']}`."]
    return "\n".join(lines)


def queries_seeds_summary(R: dict) -> str:
    """Per row: mean and spread over the seeds, and how it stands against the paper recovery on each."""
    full, groups = _seed_rows(R["queries"]["seeds"])
    parts = []
    for name, rows in groups.items():
        a = [r["acc"] for r in rows]
        mean = sum(a) / len(a)
        head = (f"`{name}` {mean:.2f} on average over {len(rows)} seeds (from {min(a):.2f} to {max(a):.2f}, "
                f"{sum(r['queries'] for r in rows) / len(rows):,.0f} queries)")
        if name != "paper_full":
            ahead = sum(apart(r["acc"], r["ci"], full[r["seed"]]["acc"], full[r["seed"]]["ci"])
                        and r["acc"] > full[r["seed"]]["acc"] for r in rows)
            behind = sum(apart(r["acc"], r["ci"], full[r["seed"]]["acc"], full[r["seed"]]["ci"])
                         and r["acc"] < full[r["seed"]]["acc"] for r in rows)
            head += (f": ahead of the paper recovery with intervals apart on {ahead} of {len(rows)} seeds, behind "
                     f"on {behind}")
        parts.append(head)
    return "; ".join(parts) + "."


def queries_seeds_mg(R: dict) -> str:
    """`--meta_generator` under 1/10 of the paper run's queries against the paper recovery, seed by seed."""
    full, groups = _seed_rows(R["queries"]["seeds"])
    rows = sorted(groups["mg_1_10"], key=lambda r: r["seed"])
    pairs = ", ".join(f"{acc(r)} against {acc(full[r['seed']])} (seed {r['seed']})" for r in rows)
    sides = [apart(r["acc"], r["ci"], full[r["seed"]]["acc"], full[r["seed"]]["ci"]) and
             (1 if r["acc"] > full[r["seed"]]["acc"] else -1) for r in rows]
    return (f"{pairs}: ahead with intervals apart on {sides.count(1)} of {len(rows)} seeds, behind on "
            f"{sides.count(-1)}")


def queries_tuning(R: dict) -> str:
    lines = ["| `--meta_generator_steps` | `--meta_generator_lr` | visits | queries | meta_val | meta_test (100 tasks) |",
             "|---|---|---|---|---|---|"]
    for r in R["queries"]["tuning"]["rows"]:
        head = f"{r['label']} | —" if r["label"] else f"{r['steps']} | {r['lr']:.1f}"
        lines.append(f"| {head} | {r['visits']} | {thousands(r['queries'])} | {r['meta_val']:.2f} | {acc(r)} |")
    return "\n".join(lines)


def queries_vs_ablation(R: dict) -> str:
    """The curve's paper run against the ablation's faithful demo, on the same code."""
    C = R["queries"]["curve"]
    p = _row(C, "paper_full")
    demo = next(r for r in R["ablation"]["recipes"]["rows"] if r["recipe"] == "faithful")
    b = demo["bidf_mkd"]
    level = "the intervals are apart" if apart(p["acc"], p["ci"], b["acc"], b["ci"]) else "the intervals overlap"
    same = [(x["acc"], x["ci"]) for x in C["lines"]] == [(demo[k]["acc"], demo[k]["ci"]) for k in ("random_init", "maml_real")]
    return (f"{acc(p)} against that demo's {acc(b)} ({level}), and "
            + ("both baselines are that demo's to the last digit" if same else "its baselines differ from that demo's"))


# ------------------------------------------------------------------ timings (bench/RESULTS.md)
def demo_timing(R: dict) -> str:
    T = R["timings"]["demo_run"]
    lines = ["| demo.sh | run | total | BiDf-MKD ended | worker 2's evaluations ended | user CPU | CPU use |",
             "|---|---|---|---|---|---|---|"]
    for r in T["runs"]:
        total = f"**{r['total_s']} s**" if r.get("current") else f"{r['total_s']} s"
        lines.append(f"| {r['setting']} | {r['start_utc']} | {total} | {r['bidf_mkd_ended_s']} s | "
                     f"{r['worker2_evaluations_ended_s']} s | {r['user_cpu_s']} s | "
                     f"{percent(r['user_cpu_s'] / r['total_s'])} |")
    return "\n".join(lines)


def boundary_ratio(R: dict) -> str:
    B = R["timings"]["boundary"]
    lines = ["| scale (32x32) | before | now (one figure per run) |", "|---|---|---|"]
    for r in B["rows"]:
        lines.append(f"| {r['scale']} | {', '.join(f'{x:.2f}' for x in r['before'])} | "
                     f"{', '.join(f'{x:.2f}' for x in r['now'])} |")
    return "\n".join(lines)


def boundary_cost(R: dict) -> str:
    L = R["timings"]["boundary"]["timing_loop"]
    return (f"about {L['perturbed_query_s'] / L['support_s']:.1f} times a support step at the paper's geometry, "
            f"against {L['clean_query_s'] / L['support_s']:.1f} times with `clean`")


# ------------------------------------------------------------------ the demo dataset's difficulty (docs/datasets.md)
def difficulty(R: dict) -> str:
    D = R["difficulty"]
    apis = D["api_held_out_acc"]
    lines = ["| check | accuracy |", "|---|---|",
             f"| 5-way conv4 APIs {'/'.join(str(i) for i in range(len(apis)))} (best held-out epoch) | "
             f"{' / '.join(map(str, apis))}% (mean {sum(apis) / len(apis):.1f}%) |"]
    for r in D["rows"]:
        cell = f"{r['acc']:.1f} ± {r['ci']:.1f}%"
        if r.get("bold"):
            cell = f"**{cell}**"
        if r.get("shot5"):
            cell += f" (5-shot {r['shot5']['acc']:.1f} ± {r['shot5']['ci']:.1f}%)"
        lines.append(f"| {r['check']} | {cell} |")
    return "\n".join(lines)


# NAME: (the result file it reads, the function that writes the block)
def refactor_demo(R: dict) -> str:
    """The demo before and after the one-core refactor, interleaved runs, and the means of each side."""
    T = R["timings"]["refactor"]
    lines = ["| code | run (UTC) | total | user CPU | CPU use | BiDf-MKD ended |", "|---|---|---|---|---|---|"]
    for r in T["demo_runs"]:
        lines.append(f"| {r['code']} ({T['commits'][r['code']]}) | {r['start_utc']} | {r['total_s']} s | "
                     f"{r['user_cpu_s']} s | {r['cpu_percent']}% | {r['bidf_mkd_ended_s']} s |")
    mean = {c: [sum(r[k] for r in T["demo_runs"] if r["code"] == c) / sum(r["code"] == c for r in T["demo_runs"])
                for k in ("total_s", "user_cpu_s")] for c in ("before", "after")}
    lines.append(f"| after / before, means | | {mean['after'][0] / mean['before'][0]:.3f} | "
                 f"{mean['after'][1] / mean['before'][1]:.3f} | | |")
    return "\n".join(lines)


def refactor_zo(R: dict) -> str:
    """bench/zo_step.py's fast / plain ratio per round and code, and the median of each code."""
    T = R["timings"]["refactor"]
    ratios = {}
    lines = ["| code | round | fast images/s | plain images/s | fast / plain |", "|---|---|---|---|---|"]
    for r in (x for x in T["zo_step"] if x["api"] == "fast"):
        plain = next(x for x in T["zo_step"] if x["api"] == "plain" and (x["code"], x["round"]) == (r["code"], r["round"]))
        ratio = r["images_per_s"] / plain["images_per_s"]
        ratios.setdefault(r["code"], []).append(ratio)
        lines.append(f"| {r['code']} ({T['commits'][r['code']]}) | {r['round']} | {thousands(round(r['images_per_s']))} "
                     f"| {thousands(round(plain['images_per_s']))} | {ratio:.2f}x |")
    med = {c: sorted(v)[len(v) // 2] for c, v in ratios.items()}
    lines.append(f"| median | | | | before {med['before']:.2f}x, after {med['after']:.2f}x "
                 f"({med['after'] / med['before']:.3f}) |")
    return "\n".join(lines)


def _robustness_cells(R: dict) -> tuple[dict, list, list]:
    X = R["robustness"]
    cells = {(r["fraction"], r["defence"], r["seed"]): r for r in X["rows"]}
    return cells, sorted({r["fraction"] for r in X["rows"]}), sorted({r["seed"] for r in X["rows"]}, reverse=True)


def robustness(R: dict) -> str:
    """Accuracy against the share of deceptive APIs, undefended and with --api_trust agree, per seed
    (results/robustness.json), each defended run against the undefended run on the clean pool."""
    X = R["robustness"]
    cells, fractions, seeds = _robustness_cells(R)
    lines = ["| deceptive APIs | seed | undefended: 1-shot (%) | vs clean | `--api_trust agree`: 1-shot (%) | "
             "vs clean (undefended) | queries (undefended / defended) | model of task (undefended / defended) |",
             "|---|---|---|---|---|---|---|---|"]
    for f in fractions:
        for seed in seeds:
            off, on, clean = cells[(f, "off", seed)], cells[(f, "agree", seed)], cells[(0.0, "off", seed)]
            lines.append(f"| {round(100 * f)}% | {seed} | {acc(off)} | {'—' if off is clean else vs(off, clean)} | "
                         f"{acc(on)} | {vs(on, clean)} | {thousands(off['api_queries'])} / "
                         f"{thousands(on['api_queries'])} | {off['chosen_task']} / {on['chosen_task']} |")
    lines += ["", f"Demo preset with a pool of {X['apis']} APIs (`--APInum {X['apis']}`), model chosen on meta_val; "
                  f"5-way 1-shot meta-test accuracy ± 95% CI over {X['test_tasks']} tasks. Measured {X['date']} on "
                  f"{X['processor']}, {X['jobs']} runs side by side. Command: `{X['command']}`."]
    return "\n".join(lines)


def robustness_detection(R: dict) -> str:
    """Per kind of API: how many the defended runs judged, and how many of those they distrusted."""
    cells, fractions, seeds = _robustness_cells(R)
    kinds = ("labels", "untrained", "uniform", "honest")
    lines = ["| deceptive APIs | seed | " + " | ".join(f"{k}: distrusted / judged" for k in kinds) +
             " | precision | recall |", "|---|---|" + "---|" * (len(kinds) + 2)]
    for f in fractions:
        for seed in seeds:
            det = cells[(f, "agree", seed)]["detection"]
            got = {k: det.get(k, {"visited": 0, "distrusted": 0}) for k in kinds}
            flagged = sum(v["distrusted"] for v in got.values())
            bad = [got[k] for k in kinds if k != "honest"]
            hit, judged = sum(v["distrusted"] for v in bad), sum(v["visited"] for v in bad)
            prec = f"{hit}/{flagged}" if flagged else "—"
            rec = f"{hit}/{judged}" if judged else "—"
            lines.append(f"| {round(100 * f)}% | {seed} | " +
                         " | ".join(f"{v['distrusted']} / {v['visited']}" if v["visited"] else "—" for v in got.values())
                         + f" | {prec} | {rec} |")
    return "\n".join(lines)


def robustness_summary(R: dict) -> str:
    """The issue's two checks, per seed: the defended run at the largest fraction against the clean pool's
    undefended run, and the defence's cost on the clean pool."""
    cells, fractions, seeds = _robustness_cells(R)
    top = max(fractions)
    worst = "; ".join(f"seed {s}: {cells[(top, 'agree', s)]['acc'] - cells[(0.0, 'off', s)]['acc']:+.2f} defended, "
                      f"{cells[(top, 'off', s)]['acc'] - cells[(0.0, 'off', s)]['acc']:+.2f} undefended" for s in seeds)
    cost = "; ".join(f"seed {s}: {cells[(0.0, 'agree', s)]['acc'] - cells[(0.0, 'off', s)]['acc']:+.2f}" for s in seeds)
    det = [r["detection"] for r in R["robustness"]["rows"] if "detection" in r]
    tally = lambda honest, key: sum(v[key] for d in det for k, v in d.items() if (k == "honest") == honest)  # noqa: E731
    visited = [len(r["deceptive_visited"]) for r in R["robustness"]["rows"] if r.get("deceptive_visited") is not None
               and r["fraction"] > 0]
    return (f"At {round(100 * top)}% deceptive APIs, against the clean pool's undefended run: {worst}. "
            f"On the clean pool the defence changes accuracy by {cost}. Over all defended runs it distrusted "
            f"{tally(False, 'distrusted')} of the {tally(False, 'visited')} deceptive APIs they judged and "
            f"{tally(True, 'distrusted')} of the {tally(True, 'visited')} honest ones; the undefended runs on "
            f"deceptive pools visited {min(visited)} to {max(visited)} deceptive APIs each.")


GENERATORS = {
    "demo-provenance": ("demo", demo_provenance),
    "demo": ("demo", demo_table),
    "demo-summary": ("demo", demo_summary),
    "demo-gap": ("demo", demo_gap),
    "demo-faithful-1shot": ("demo", demo_faithful_1shot),
    "demo-visits": ("demo", demo_visits),
    "demo-apart": ("demo", demo_apart),
    "demo-kernels": ("demo", demo_kernels),
    "demo-other-kernels": ("demo", demo_other_kernels),
    "ablation": ("ablation", ablation_table),
    "ablation-switch-range": ("ablation", ablation_switch_range),
    "ablation-recipes": ("ablation", ablation_recipes),
    "ablation-switches": ("ablation_switches", ablation_switches),
    "ablation-switches-summary": ("ablation_switches", ablation_switches_summary),
    "ablation-additions": ("ablation_additions", ablation_additions),
    "ablation-additions-summary": ("ablation_additions", ablation_additions_summary),
    "ablation-additions-means": ("ablation_additions", ablation_additions_means),
    "improved-gap": ("ablation_additions", improved_gap),
    "improved-gap-summary": ("ablation_additions", improved_gap_summary),
    "faithful-gap": ("ablation_additions", faithful_gap),
    "faithful-plus4": ("ablation_additions", faithful_plus4),
    "replay-long": ("ablation_additions", replay_long),
    "replay-long-flat": ("ablation_additions", replay_long_flat),
    "replay-long-improved": ("ablation_additions", replay_long_improved),
    "replay-long-summary": ("ablation_additions", replay_long_summary),
    "replay-long-min": ("ablation_additions", replay_long_min),
    "replay-long-seconds": ("ablation_additions", replay_long_seconds),
    "fidelity": ("fidelity", fidelity),
    "fidelity-lowres": ("fidelity", fidelity_lowres),
    "recovery-quality": ("recovery_quality", recovery_quality),
    "screen-target-acc": ("recovery_quality", screen_target_acc),
    "side-by-side": ("side_by_side", side_by_side),
    "side-by-side-summary": ("side_by_side", side_by_side_summary),
    "queries-curve": ("queries", queries_curve),
    "queries-rerun": ("queries", queries_rerun),
    "queries-seed2023": ("queries", queries_seed2023),
    "queries-tuning": ("queries", queries_tuning),
    "queries-seeds": ("queries", queries_seeds),
    "queries-seeds-summary": ("queries", queries_seeds_summary),
    "queries-seeds-mg": ("queries", queries_seeds_mg),
    "queries-vs-ablation": ("queries", queries_vs_ablation),
    "demo-timing": ("timings", demo_timing),
    "boundary-ratio": ("timings", boundary_ratio),
    "boundary-cost": ("timings", boundary_cost),
    "difficulty": ("difficulty", difficulty),
    "refactor-demo": ("timings", refactor_demo),
    "refactor-zo": ("timings", refactor_zo),
    "robustness": ("robustness", robustness),
    "robustness-detection": ("robustness", robustness_detection),
    "robustness-summary": ("robustness", robustness_summary),
}


# ------------------------------------------------------------------ pages
def pages(root: str = ROOT) -> list[str]:
    """The pages that hold tables, relative to root."""
    out = ["README.md"] + sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    if os.path.exists(os.path.join(root, "bench", "RESULTS.md")):
        out.append(os.path.join("bench", "RESULTS.md"))
    return [p.replace(os.sep, "/") for p in out]


class MarkerError(ValueError):
    pass


def render(text: str, R: dict, page: str = "") -> tuple[str, list[tuple[str, str, str, str]]]:
    """(text with every generated block rewritten, [(kind, name, old content, new content)] per block)."""
    out, blocks, pos = [], [], 0
    for m in OPEN.finditer(text):
        if m.start() < pos:
            raise MarkerError(f"{page}: marker {m.group(0)} inside another generated block")
        kind, name = m.group(1), m.group(2)
        close = f"<!-- /{kind} -->"
        end = text.find(close, m.end())
        if end < 0:
            raise MarkerError(f"{page}: {m.group(0)} has no {close}")
        if name not in GENERATORS:
            raise MarkerError(f"{page}: {m.group(0)}: no generator named {name!r} in experiments/tables.py")
        line_start = m.start() == 0 or text[m.start() - 1] == "\n"
        block = line_start and text.startswith("\n", m.end())
        if line_start and not block:
            raise MarkerError(f"{page}: {m.group(0)} starts a line but is followed by text on it; put a block's "
                              "markers on lines of their own, or an inline one after other text")
        body = GENERATORS[name][1](R)
        new = f"\n{body}\n" if block else body
        old = text[m.end():end]
        blocks.append((kind, name, old, new))
        out += [text[pos:m.end()], new]
        pos = end
    out.append(text[pos:])
    return "".join(out), blocks


def unsourced(text: str, page: str, figures: set) -> list[str]:
    """Every "acc ± ci" figure of a page that no result file holds."""
    bad = []
    for m in FIGURE.finditer(text):
        key = (round(float(m.group(1)), 6), round(float(m.group(2)), 6))
        if key not in figures and (page, m.group(0)) not in NOT_MEASURED:
            line = text.count("\n", 0, m.start()) + 1
            bad.append(f"{page}:{line}: {m.group(0)} is in no file of {RESULTS}/ (add its run there, or drop it)")
    return bad


def check(root: str = ROOT, R: dict | None = None, files: list[str] | None = None) -> list[str]:
    """Every problem as one message: blocks that differ from their result file, unsourced figures,
    broken markers. Empty when the pages agree with results/. Changes nothing."""
    R = load(root) if R is None else R
    figures = measured_figures(R)
    problems = []
    for page in files or pages(root):
        with open(os.path.join(root, page), encoding="utf-8") as f:
            text = f.read()
        try:
            _, blocks = render(text, R, page)
        except (MarkerError, KeyError, StopIteration) as e:
            problems.append(f"{page}: {e!r}" if not isinstance(e, MarkerError) else str(e))
            continue
        for kind, name, old, new in blocks:
            if old != new:
                diff = "\n".join(difflib.unified_diff(old.strip("\n").splitlines(), new.strip("\n").splitlines(),
                                                      "page", f"{RESULTS}/{GENERATORS[name][0]}.json", lineterm="", n=0))
                problems.append(f"{page}: {kind} '{name}' differs from {RESULTS}/{GENERATORS[name][0]}.json\n{diff}")
        problems += unsourced(text, page, figures)
    return problems


def write(root: str = ROOT, R: dict | None = None) -> list[str]:
    """Rewrite every generated block; returns the pages changed."""
    R = load(root) if R is None else R
    changed = []
    for page in pages(root):
        path = os.path.join(root, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, _ = render(text, R, page)
        if new != text:
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(new)
            os.replace(tmp, path)
            changed.append(page)
    return changed


# ------------------------------------------------------------------ importing a demo run
def _git_commit(root: str) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def import_demo(run_dir: str, recipe: str, machine: str, kernels: str | None = None, date: str | None = None,
                commit: str | None = None, command: str | None = None, root: str = ROOT) -> dict:
    """Put a finished demo run (RUN_DIR/results.json) into results/demo.json as the given recipe's entry."""
    if recipe not in RECIPES:
        raise SystemExit(f"error: --recipe must be one of {', '.join(RECIPES)}")
    path = os.path.join(run_dir, "results.json")
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: {e}; run `python -m reporting {run_dir}` first")
    rows = {(r["method"], r["shot"]): r for r in run.get("rows", [])}
    missing = [f"{m} {s}-shot" for m, _ in DEMO_METHODS for s in SHOTS if (m, s) not in rows]
    if missing or run.get("api_queries") is None or run.get("api_visits") is None:
        raise SystemExit(f"error: {path} is not a finished demo: missing {', '.join(missing) or 'the query count'}")
    tasks = sorted({rows[k].get("tasks") for k in rows if rows[k].get("tasks")})
    entry = {
        "date": date or datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine,
        "kernels": kernels or "the machine's own kernels",
        "command": command or ("DEMO_RECIPE=improved bash scriptskd/demo.sh" if recipe == "improved" else "bash scriptskd/demo.sh"),
        "commit": commit or _git_commit(root) or "unknown",
        "run_dir": os.path.basename(os.path.normpath(run_dir)),
        "test_tasks": tasks[0] if len(tasks) == 1 else tasks,
        "api_visits": run["api_visits"],
        "api_queries": run["api_queries"],
        "wall_seconds": run.get("wall_seconds"),
        "rows": [{"method": m, "shot": s, "acc": rows[(m, s)]["acc"], "ci": rows[(m, s)]["ci"]}
                 for m, _ in DEMO_METHODS for s in SHOTS],
    }
    demo_path = os.path.join(root, RESULTS, "demo.json")
    with open(demo_path) as f:
        demo = json.load(f)
    demo["recipes"][recipe] = entry
    tmp = demo_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(demo, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, demo_path)
    return entry


# ------------------------------------------------------------------ command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=FIX, description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a generated block disagrees "
                                                        "with its result file")
    p.add_argument("--root", default=ROOT, help=argparse.SUPPRESS)
    g = p.add_argument_group("importing a demo run into results/demo.json (then every page is rewritten)")
    g.add_argument("--import-demo", metavar="RUN_DIR", help="a finished demo's directory (its results.json)")
    g.add_argument("--recipe", choices=RECIPES, help="which columns of the README's table it measured")
    g.add_argument("--machine", help='where it ran, as the README should say it, e.g. "the development machine '
                                     '(Intel Xeon, 2 CPU cores, no GPU, torch 2.14.1)"')
    g.add_argument("--kernels", help="which kernels (default: the machine's own kernels)")
    g.add_argument("--date", help="YYYY-MM-DD (default: when results.json was written)")
    g.add_argument("--commit", help="default: git rev-parse --short HEAD")
    g.add_argument("--command", help="default: bash scriptskd/demo.sh (with DEMO_RECIPE=improved for improved)")
    a = p.parse_args(argv)
    if a.import_demo:
        if a.check or not a.recipe or not a.machine:
            p.error("--import-demo needs --recipe and --machine, and no --check")
        entry = import_demo(a.import_demo, a.recipe, a.machine, a.kernels, a.date, a.commit, a.command, a.root)
        print(f"{RESULTS}/demo.json: {a.recipe} <- {a.import_demo} ({entry['date']}, commit {entry['commit']})")
    try:
        R = load(a.root)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: a file of {RESULTS}/ does not read as JSON: {e}", file=sys.stderr)
        return 1
    if a.check:
        problems = check(a.root, R)
        for msg in problems:
            print(msg)
        if problems:
            print(f"\n{len(problems)} problem(s). Tables and figures are generated from {RESULTS}/: run `{FIX}` "
                  f"to rewrite the blocks (edit the result file, not the page).")
            return 1
        print(f"every generated block agrees with {RESULTS}/")
        return 0
    try:
        changed = write(a.root, R)
    except (MarkerError, KeyError, StopIteration) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for page in changed:
        print(f"rewrote {page}")
    problems = [m for m in check(a.root, R) if "is in no file of" in m]
    for msg in problems:
        print(msg)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
