"""The demo's results table: one row per (method, shot), from the runs' summary.json files.

Layout read (written by scriptskd/demo.sh):
    <out>/<method>/                  training runs (bidf_mkd, maml_real): metrics.jsonl, summary.json, best.pth
    <out>/eval/<method>_<shot>shot/  600-task meta_test evaluations (main.py --evaluate): summary.json
"""
from __future__ import annotations

import json
import os

from core.io import atomic_json, atomic_text

METHODS = (("random_init", "random-init meta model"),
           ("bidf_mkd", "BiDf-MKD (black-box, ZO)"),
           ("maml_real", "MAML on the real meta-train data (upper bound)"))
SHOTS = (1, 5)


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def collect(out: str) -> dict:
    """{"rows": [{"method", "shot", "acc", "ci", "tasks"}], "api_queries", "wall_seconds", ...}."""
    rows = []
    for method, _ in METHODS:
        for shot in SHOTS:
            s = _read(os.path.join(out, "eval", f"{method}_{shot}shot", "summary.json"))
            if s is not None:
                rows.append({"method": method, "shot": shot, "acc": round(s["test_acc"], 2),
                             "ci": round(s["test_ci"], 2), "tasks": s.get("episode_test")})
    bidf = _read(os.path.join(out, "bidf_mkd", "summary.json")) or {}
    real = _read(os.path.join(out, "maml_real", "summary.json")) or {}
    timing = _read(os.path.join(out, "timing.json")) or {}
    return {"rows": rows, "api_queries": bidf.get("api_queries"), "api_visits": bidf.get("api_visits"),
            "meta_train_tasks": {"bidf_mkd": bidf.get("tasks"), "maml_real": real.get("tasks")},
            "wall_seconds": timing.get("total"), "stage_seconds": timing.get("stages", {})}


def overlap(rows: list[dict], a: str, b: str, shot: int) -> bool | None:
    """Do the 95% intervals of methods a and b overlap at this shot? None when a row is missing."""
    ra = next((r for r in rows if r["method"] == a and r["shot"] == shot), None)
    rb = next((r for r in rows if r["method"] == b and r["shot"] == shot), None)
    if ra is None or rb is None:
        return None
    return abs(ra["acc"] - rb["acc"]) <= ra["ci"] + rb["ci"]


def markdown(res: dict, note: str = "") -> str:
    """The table as Markdown."""
    names = dict(METHODS)
    lines = ["| method | 5-way 1-shot | 5-way 5-shot |", "|---|---|---|"]
    for method, _ in METHODS:
        cells = []
        for shot in SHOTS:
            r = next((r for r in res["rows"] if r["method"] == method and r["shot"] == shot), None)
            cells.append(f"{r['acc']:.2f} ± {r['ci']:.2f}" if r else "—")
        lines.append(f"| {names[method]} | {cells[0]} | {cells[1]} |")
    tasks = {r["tasks"] for r in res["rows"] if r.get("tasks")}
    lines.append("")
    lines.append(f"Meta-test accuracy (%) ± 95% CI over {', '.join(map(str, sorted(tasks))) or '?'} tasks. "
                 f"API queries spent by BiDf-MKD: {res['api_queries']:,} in {res['api_visits']} API visits. "
                 f"Wall time of the whole demo: {res['wall_seconds']:.0f} s."
                 if res.get("api_queries") is not None and res.get("wall_seconds") is not None else "")
    if res.get("stage_seconds"):
        lines.append("Stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["stage_seconds"].items()) + ".")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write(out: str, note: str = "") -> dict:
    """results.json and results.md in <out>; returns the results."""
    res = collect(out)
    atomic_json(res, os.path.join(out, "results.json"))
    atomic_text(markdown(res, note), os.path.join(out, "results.md"))
    return res
