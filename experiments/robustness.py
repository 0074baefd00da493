"""Untrusted APIs on the demo: accuracy against the share of deceptive APIs, without and with --api_trust
agree, and how well the defence finds the deceptive APIs (docs/robustness.md).

    python -m experiments.robustness                     # 0%, 20%, 40% x off/agree x seeds 2022, 7
    python -m experiments.robustness --fractions 0,0.4 --seeds 2022 --jobs 2 --out runs/robustness

A clean pool of --apis demo APIs (`pretrain.py --preset demo --APInum N`), deceptive copies of it
(`python -m synthesis.deceive`, the three kinds in turn; a smaller fraction's deceptive APIs are a larger
one's), then `main.py --preset demo --APInum N [--api_trust agree] --seed S` on each and a 600-task 1-shot
evaluation (experiments/ablation.py's run_main). Detection is read from the defended runs' trust records
(metrics.jsonl) against each pool's truth file: only this script reads the truth. Writes
<out>/robustness.json and, with --results, results/robustness.json and docs/figs/robustness.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments.ablation import _run, processor, run_main  # noqa: E402

DEFENCES = {"off": [], "agree": ["--api_trust", "agree"]}


def pool_path(out: str, fraction: float) -> str:
    return os.path.join(out, "pool_clean" if fraction == 0 else f"pool_deceptive_{round(100 * fraction)}")


def detection(run_dir: str, truth: dict) -> dict:
    """Per kind (and honest): APIs of that kind the run visited, and how many of them it distrusted."""
    kind = {r["api"]: r["kind"] for r in truth["apis"]}
    verdicts = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        row = json.loads(line)
        if "trust" in row:
            v = row["trust"]
            verdicts[v["api"]] = verdicts.get(v["api"], True) and v["trusted"]
    out = {}
    for api, trusted in verdicts.items():
        d = out.setdefault(kind.get(api, "honest"), {"visited": 0, "distrusted": 0})
        d["visited"] += 1
        d["distrusted"] += int(not trusted)
    return out


def deceptive_queried(run_dir: str, truth: dict) -> list[str]:
    """The deceptive APIs the run queried (its last.pth query meter): without the defence, those it visited."""
    from core.io import load_checkpoint
    bad = {r["api"] for r in truth["apis"] if r["kind"] != "honest"}
    return sorted(k for k in load_checkpoint(os.path.join(run_dir, "last.pth"))["pool"]["per_api"] if k in bad)


def figure(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for (defence, label), colour in zip((("off", "undefended"), ("agree", "--api_trust agree")), ("C3", "C0")):
        rs = [r for r in rows if r["defence"] == defence]
        fr = sorted({r["fraction"] for r in rs})
        mean = [sum(r["acc"] for r in rs if r["fraction"] == f) / len([r for r in rs if r["fraction"] == f])
                for f in fr]
        ax.plot([100 * f for f in fr], mean, "-", color=colour, label=f"{label} (mean of seeds)")
        for r in rs:
            ax.errorbar(100 * r["fraction"] + (1 if defence == "agree" else -1), r["acc"], yerr=r["ci"], fmt="o",
                        color=colour, ms=3, alpha=0.6, capsize=2)
    ax.set_xlabel("deceptive APIs in the pool (%)")
    ax.set_ylabel("5-way 1-shot meta-test accuracy (%)")
    ax.set_title("Demo: accuracy against deceptive APIs (each seed ± 95% CI)", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m experiments.robustness", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/robustness")
    p.add_argument("--data_root", default="./DFL2Ldata")
    p.add_argument("--apis", type=int, default=20, help="APIs in the clean pool")
    p.add_argument("--fractions", default="0,0.2,0.4")
    p.add_argument("--seeds", default="2022,7")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--test_tasks", type=int, default=600)
    p.add_argument("--results", action="store_true", help="also write results/robustness.json and the figure")
    a = p.parse_args(argv)
    out, data_root = os.path.abspath(a.out), os.path.abspath(a.data_root)
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    fractions = [float(f) for f in a.fractions.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    _run(["-m", "dataset.demo", "--data_root", data_root], os.path.join(out, "data.log"), 2)
    _run(["pretrain.py", "--preset", "demo", "--APInum", str(a.apis), "--data_root", data_root, "--no-tensorboard",
          "--pretrained_path_prefix", pool_path(out, 0)], os.path.join(out, "pool_clean.log"), os.cpu_count() or 1)
    truths = {}
    for f in fractions:
        if f > 0 and not os.path.isfile(os.path.join(pool_path(out, f), "deception_truth.json")):
            _run(["-m", "synthesis.deceive", "--pretrained_path_prefix", pool_path(out, 0), "--dataset", "demo",
                  "--APInum", str(a.apis), "--fraction", str(f), "--out", pool_path(out, f)],
                 os.path.join(out, "deceive.log"), 1)
        truths[f] = (json.load(open(os.path.join(pool_path(out, f), "deception_truth.json"))) if f > 0 else
                     {"apis": []})

    def one(f: float, defence: str, seed: int) -> dict:
        tag = f"d{round(100 * f)}_{defence}_seed{seed}"
        r = run_main(tag, ["--APInum", str(a.apis), *DEFENCES[defence]], pool_path(out, f), out, data_root,
                     a.test_tasks, seed)
        r.update(fraction=f, defence=defence)
        if defence == "off":
            r["deceptive_visited"] = deceptive_queried(os.path.join(out, tag), truths[f])
        else:
            r["detection"] = detection(os.path.join(out, tag), truths[f])
        return r

    jobs = [(f, d, s) for s in seeds for f in fractions for d in DEFENCES]
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        rows = []
        for r in ex.map(lambda j: one(*j), jobs):
            rows.append(r)
            print(f"[robustness] {round(100 * r['fraction'])}% deceptive, {r['defence']}, seed {r['seed']}: "
                  f"{r['acc']:.2f} ± {r['ci']:.2f}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "processor": processor(), "jobs": a.jobs, "apis": a.apis,
            "test_tasks": a.test_tasks, "command": "python -m experiments.robustness" +
            (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
            "pools": {str(f): [{"api": x["api"], "kind": x["kind"]} for x in t["apis"] if x["kind"] != "honest"]
                      for f, t in truths.items()}}
    from core.io import atomic_json
    atomic_json({"rows": rows, **meta}, os.path.join(out, "robustness.json"))
    if a.results:
        atomic_json({"rows": rows, **meta}, os.path.join(ROOT, "results", "robustness.json"))
        figure(rows, os.path.join(ROOT, "docs", "figs", "robustness.png"))
    return rows


if __name__ == "__main__":
    main()
