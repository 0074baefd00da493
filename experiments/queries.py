"""Meta-test accuracy against API queries on the demo: the paper's recovery and --meta_generator at
several query budgets.

    python -m experiments.queries                              # every row (bash scriptskd/queries.sh does this)
    python -m experiments.queries --rows paper_full,mg_1_10 --demo_dir runs/demo-... --out runs/queries

Each row is `main.py --preset demo <its flags> --query_budget <its share of the full run's queries>`
(400 tasks, seed 2022, model chosen on meta_val), then a 600-task 5-way 1-shot meta-test evaluation of
its best.pth. The budgets are fractions of the queries the unbudgeted paper run (`paper_full`, which
runs first) actually spent, or exactly one API visit (`paper_1_visit`: the paper's recovery cannot run
on less). Random init and MAML on the real images are read from a demo run directory
(--demo_dir, the one `bash scriptskd/demo.sh` printed), else run here. Writes <out>/results.json
({"rows": [{method, queries, acc, ci, ...}]}), <out>/results.md and <out>/figs/accuracy_vs_queries.png;
rerunning the same command skips finished rows and resumes unfinished ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.ablation import _run, processor  # noqa: E402

PAPER, META = "paper recovery (fresh generator, 40 steps)", "meta-generator (--meta_generator)"
ONE_VISIT = "one visit"     # a budget of exactly one API visit of the row's flags (core.config.visit_cost)
# name -> (method, main.py flags, budget as a fraction of paper_full's queries; None: no budget).
# --meta_generator runs --meta_generator_steps (default 4) steps per set instead of 40.
ROWS = {
    "paper_full": (PAPER, [], None),
    "paper_1_3": (PAPER, [], Fraction(1, 3)),
    # 1/10 of the full run does not cover one visit of the paper's recovery: its smallest run is one visit
    "paper_1_visit": (PAPER, [], ONE_VISIT),
    "mg_full": (META, ["--meta_generator"], None),
    "mg_1_10": (META, ["--meta_generator"], Fraction(1, 10)),
    "mg_1_30": (META, ["--meta_generator"], Fraction(1, 30)),
    # the meta-generator with the low-resolution estimator (docs/differences.md B16) at the same budget
    "mg_lowres_1_10": ("meta-generator, 4 x 4 directions", ["--meta_generator", "--zo_resolution", "4"], Fraction(1, 10)),
    # the control: as few steps per set as --meta_generator, but each from a fresh generator
    "fresh_4steps": ("paper recovery, 4 steps (control)", ["--generate_iterations", "4"], None),
}


def _summary(d: str) -> dict | None:
    path = os.path.join(d, "summary.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def run_row(name: str, out: str, data_root: str, pool: str, test_tasks: int, full: int | None,
            extra: list[str]) -> dict:
    """Train (or skip) and evaluate (or skip) one row; its results line."""
    method, flags, share = ROWS[name]
    run, ev = os.path.join(out, name), os.path.join(out, "eval", name)
    log = os.path.join(out, f"{name}.log")
    common = ["--preset", "demo", "--data_root", data_root]
    if share == ONE_VISIT:
        from core.config import visit_cost
        from main import parse_args
        budget = visit_cost(parse_args([*common, *flags, *extra]))
    else:
        budget = None if share is None else int(full * share)
    flags = [*flags, *extra, *(["--query_budget", str(budget)] if budget is not None else [])]
    if _summary(run) is None:
        _run(["main.py", *common, *flags, "--pretrained_path_prefix", pool, "--out_dir", run, "--resume"], log, 1)
    if _summary(ev) is None:
        _run(["main.py", *common, *flags, "--evaluate", os.path.join(run, "best.pth"), "--num_sup_test", "1",
              "--episode_test", str(test_tasks), "--out_dir", ev, "--resume"], log, 1)
    train, test = _summary(run), _summary(ev)
    return {"row": name, "method": method, "flags": " ".join(flags), "budget": budget,
            "queries": train["api_queries"], "visits": train["api_visits"], "acc": round(test["test_acc"], 2),
            "ci": round(test["test_ci"], 2), "train_seconds": train["wall_seconds"]}


def baselines(out: str, data_root: str, demo_dir: str | None, test_tasks: int) -> dict[str, tuple[float, float]]:
    """{label: (acc, ci)} of random init and MAML on the real images, 5-way 1-shot, 600 tasks."""
    found = {}
    # a demo directory names them <method>_1shot; an earlier --out of this module, <method>
    for label, subs in (("random init", ("random_init_1shot", "random_init")),
                        ("MAML on real data", ("maml_real_1shot", "maml_real"))):
        s = next((x for x in (_summary(os.path.join(demo_dir, "eval", d)) for d in subs) if x), None) \
            if demo_dir else None
        if s is None:
            s = _baseline(label, out, data_root, test_tasks)
        found[label] = (round(s["test_acc"], 2), round(s["test_ci"], 2))
    return found


def _baseline(label: str, out: str, data_root: str, test_tasks: int) -> dict:
    common = ["--preset", "demo", "--data_root", data_root]
    log = os.path.join(out, "baselines.log")
    evaluate = ["--num_sup_test", "1", "--episode_test", str(test_tasks), "--resume"]
    if label == "random init":
        ev = os.path.join(out, "eval", "random_init")
        if _summary(ev) is None:
            _run(["main.py", *common, "--evaluate", "random", *evaluate, "--out_dir", ev], log, 1)
        return _summary(ev)
    run, ev = os.path.join(out, "maml_real"), os.path.join(out, "eval", "maml_real")
    if _summary(run) is None:
        _run(["main.py", *common, "--baseline", "maml_real", "--out_dir", run, "--resume"], log, 1)
    if _summary(ev) is None:
        _run(["main.py", *common, "--evaluate", os.path.join(run, "best.pth"), *evaluate, "--out_dir", ev], log, 1)
    return _summary(ev)


def markdown(rows: list[dict], lines: dict, meta: dict) -> str:
    full = next((r for r in rows if r["row"] == "paper_full"), None)
    out = ["| row | method | query budget | API queries | vs paper_full | visits | 5-way 1-shot (%) | training s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"1/{full['queries'] / r['queries']:.1f}" if full and r["queries"] else "—"
        budget = f"{r['budget']:,}" if r["budget"] is not None else "none"
        out.append(f"| {r['row']} | {r['method']} | {budget} | {r['queries']:,} | {ratio} | {r['visits']} | "
                   f"{r['acc']:.2f} ± {r['ci']:.2f} | {r['train_seconds']:.0f} |")
    for label, (acc, ci) in lines.items():
        out.append(f"| — | {label} | — | 0 | — | — | {acc:.2f} ± {ci:.2f} | — |")
    out += ["", f"Demo preset (`--preset demo`, 400 tasks), seed 2022, model chosen on meta_val; 5-way 1-shot "
                f"meta-test accuracy ± 95% CI over {meta['test_tasks']} tasks. Measured {meta['date']} on "
                f"{meta['processor']}, one run at a time, one thread each; commit {meta['commit']}. "
                f"Command: `{meta['command']}`."]
    return "\n".join(out) + "\n"


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m experiments.queries", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/queries")
    p.add_argument("--data_root", default="./DFL2Ldata")
    p.add_argument("--pool", default="./pretrained_blackbox", help="--pretrained_path_prefix of the demo pool "
                   "(made here with `pretrain.py --preset demo` if missing, as the demo does)")
    p.add_argument("--demo_dir", default=None, help="a demo run directory (or an earlier --out of this module) "
                   "to take the two baselines from")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--test_tasks", type=int, default=600)
    p.add_argument("--flags", default="", help="extra main.py flags for every row (e.g. '--meta_generator_steps 4')")
    p.add_argument("--list", action="store_true", help="print the rows (method, main.py flags, budget) as JSON; run nothing")
    p.add_argument("--seeds_figure", metavar="PNG", help="draw results/queries.json's three-seed curve into PNG "
                   "(docs/figs/accuracy_vs_queries_seeds.png); run nothing")
    a = p.parse_args(argv)
    if a.seeds_figure:
        from reporting.figures import accuracy_vs_queries_seeds
        T = json.load(open(os.path.join(ROOT, "results", "queries.json")))["seeds"]
        accuracy_vs_queries_seeds(T["rows"], a.seeds_figure, {r["label"]: (r["acc"], r["ci"]) for r in T["lines"]})
        return []
    if a.list:
        print(json.dumps({name: {"method": m, "flags": f, "budget": None if s is None else str(s)}
                          for name, (m, f, s) in ROWS.items()}))
        return []
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose among {', '.join(ROWS)}")
    out, data_root, pool = (os.path.abspath(x) for x in (a.out, a.data_root, a.pool))
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    _run(["-m", "dataset.demo", "--data_root", data_root], os.path.join(out, "data.log"), 1)
    _run(["pretrain.py", "--preset", "demo", "--data_root", data_root, "--pretrained_path_prefix", pool],
         os.path.join(out, "pool.log"), 1)
    extra = a.flags.split()
    full = None
    if any(isinstance(ROWS[r][2], Fraction) for r in rows):      # budgets are shares of what the full paper run spent
        full = run_row("paper_full", out, data_root, pool, a.test_tasks, None, extra)["queries"]
    table = []
    for r in rows:
        table.append(run_row(r, out, data_root, pool, a.test_tasks, full, extra))
        print(f"[queries] {r}: {table[-1]['queries']:,} queries, {table[-1]['acc']:.2f} ± {table[-1]['ci']:.2f}",
              flush=True)
    lines = baselines(out, data_root, a.demo_dir, a.test_tasks)
    meta = {"date": time.strftime("%Y-%m-%d"), "processor": processor(), "test_tasks": a.test_tasks,
            "commit": _commit(),
            "command": "python -m experiments.queries" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()}
    from core.io import atomic_json, atomic_text
    from reporting.figures import accuracy_vs_queries
    atomic_json({"rows": table, "baselines": {k: {"acc": v[0], "ci": v[1]} for k, v in lines.items()}, **meta},
                os.path.join(out, "results.json"))
    atomic_text(markdown(table, lines, meta), os.path.join(out, "results.md"))
    os.makedirs(os.path.join(out, "figs"), exist_ok=True)
    accuracy_vs_queries(table, os.path.join(out, "figs", "accuracy_vs_queries.png"), lines)
    print(markdown(table, lines, meta))
    return table


if __name__ == "__main__":
    main()
