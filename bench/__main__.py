"""BiDf-MKD benchmarks: what one step of each part of the method costs, at the demo's and the paper's scale.

    python -m bench                              # all four, demo and paper scale, 32x32 and 84x84 (~5 min on 2 CPU cores)
    python -m bench --quick                      # one repetition, 32x32 only, no paper-scale visit on a CPU (< 1 min)
    python -m bench --heavy                      # also the paper-scale 84x84 API visit on a CPU (+4 min, ~3 GB)
    python -m bench --device cuda --out bench/out/gpu.json
    python -m bench --only zo_step,kd_task --sizes 84
    python -m bench --markdown                   # measure, then print the tables of bench/RESULTS.md
    python -m bench --markdown --from bench/out/results.json     # tables of an earlier run, no measuring
    python -m bench --estimate -- --preset paper_ss              # projected cost of a whole main.py run

Measurements (bench/suite.py): zo_step (one zero-order generator step), kd_task (one API visit:
bi-level KD, recovery extrapolated from a few generator steps), replay_batch (one meta-batch of
replay tasks), eval_task (one test task). Randomly initialised networks, synthetic tensors: no
pool and no dataset needed. Prints one JSON document (or the markdown tables with --markdown) and
writes the JSON to --out; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from core.errors import BidfError, FlagError, Interrupted
from core.io import atomic_json

NAMES = ("zo_step", "kd_task", "replay_batch", "eval_task")
ALIASES = {"zo": "zo_step", "kd": "kd_task", "replay": "replay_batch", "eval": "eval_task"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:9]))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--quick", action="store_true",
                   help="one repetition per cell, one generator step per recovery, 32x32 only unless --sizes is "
                        "given, no paper-scale API visit on the CPU unless --heavy")
    p.add_argument("--only", default=",".join(NAMES),
                   help="comma-separated subset of zo_step,kd_task,replay_batch,eval_task (or zo,kd,replay,eval)")
    p.add_argument("--scales", default="demo,paper", help="comma-separated subset of demo,paper")
    p.add_argument("--sizes", default=None, help="comma-separated image sizes (default 32,84; --quick: 32)")
    p.add_argument("--kd_steps", type=int, default=None,
                   help="generator steps per recovery in a measured API visit (default 2; --quick: 1)")
    p.add_argument("--heavy", action="store_true",
                   help="on the CPU, also run the paper-scale API visit above 32x32 (and with --quick at 32x32); "
                        "skipped otherwise: one 84x84 visit with one generator step per recovery takes minutes on a "
                        "small CPU (bench/RESULTS.md)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=parser_default_out(), help="JSON file to write (with --estimate: only if given)")
    p.add_argument("--markdown", action="store_true", help="print markdown tables instead of the JSON")
    p.add_argument("--from", dest="from_file", default=None, metavar="JSON",
                   help="with --markdown: render an earlier results file, measure nothing")
    p.add_argument("--estimate", action="store_true",
                   help="project the wall time, peak memory and disk of the main.py run whose flags follow `--` "
                        "(bench/estimate.py); the last line printed is JSON")
    p.add_argument("--visits", default="bound",
                   help="with --estimate: API visits assumed: bound (the most the trigger allows), demo (the "
                        "demo's observed rate) or a number")
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = []
    if "--" in argv:
        i = argv.index("--")
        argv, flags = argv[:i], argv[i + 1:]
    a = p.parse_args(argv)
    a.main_flags = flags
    if flags and not a.estimate:
        p.error("flags after `--` are main.py's and go with --estimate")
    if a.visits not in ("bound", "demo") and not a.visits.isdigit():
        p.error(f"--visits takes bound, demo or a number, got {a.visits!r}")
    a.only = [ALIASES.get(n.strip(), n.strip()) for n in a.only.split(",") if n.strip()]
    bad = [n for n in a.only if n not in NAMES]
    if bad:
        p.error(f"--only: unknown measurement(s) {', '.join(bad)}; choose from {', '.join(NAMES)}")
    a.scales = [s.strip() for s in a.scales.split(",") if s.strip()]
    if not a.scales or any(s not in ("demo", "paper") for s in a.scales):
        p.error("--scales takes demo, paper or demo,paper")
    try:
        a.sizes = [int(s) for s in (a.sizes or ("32" if a.quick else "32,84")).split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes takes comma-separated integers, got {a.sizes!r}")
    if any(s < 16 for s in a.sizes):
        p.error("--sizes: conv4 needs images of at least 16x16")
    if a.kd_steps is not None and a.kd_steps < 1:
        p.error("--kd_steps must be at least 1")
    if a.from_file and not a.markdown:
        p.error("--from only goes with --markdown")
    return a


def parser_default_out() -> str:
    return os.path.join("bench", "out", "results.json")


def write_json(doc: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    atomic_json(doc, path)


def device_of(name: str):
    """--device: auto (CUDA when there is one), cpu, cuda or cuda:N (core.device picks CUDA devices)."""
    import torch

    from core.device import pick_device
    if name in ("auto", "cpu"):
        return pick_device(0) if name == "auto" else torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:") and name[5:].isdigit():
        if not torch.cuda.is_available():
            raise FlagError("--device cuda but torch sees no CUDA device; use --device cpu")
        return pick_device(int(name[5:] or 0) if ":" in name else 0)
    raise FlagError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N")


def heavy(name: str, scale: str, size: int, device, quick: bool) -> bool:
    """Cells too big for a default (or --quick) run on a small CPU machine: the paper-scale API visit
    above 32x32 (with --quick: at any size; ~35 s at 32x32 on the busy 2-core machine)."""
    return device.type == "cpu" and name == "kd_task" and scale == "paper" and (size > 32 or quick)


def measure(a: argparse.Namespace) -> dict:
    import torch

    from bench import measure as m
    from bench.report import ORIGINAL_ZO_STEP
    from bench.scales import load_scales, settings_of
    from bench.suite import SHOTS, Plan, run_cell

    if a.threads:
        torch.set_num_threads(a.threads)
    device = device_of(a.device)
    plan = (Plan(min_reps=1, max_reps=1, budget_s=0.0, kd_steps=a.kd_steps or 1, warmup=True) if a.quick
            else Plan(kd_steps=a.kd_steps or 2))
    scales = load_scales()
    t_start = time.perf_counter()
    doc = {"command": " ".join(["python -m bench", *sys.argv[1:]]).strip(),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "environment": m.environment(device), "loadavg_start": m.loadavg(),
           "peak_memory_note": ("CUDA: torch.cuda.max_memory_allocated during the measurement." if device.type == "cuda" else
            "CPU: the process's peak resident set (VmHWM, the counter getrusage's ru_maxrss reads), reset "
            "before each measurement; the whole process, torch's libraries included (~0.3-0.5 GB)."),
           "plan": vars(plan) | {"quick": a.quick, "sizes": a.sizes, "scales": a.scales},
           "settings": {name: {"source": src, "main_py_flags": " ".join(flags),
                               **{k: settings_of(cfg, k) for k in a.only}}
                        for name, (cfg, src, flags) in scales.items()},
           "reference": {"zo_step_original": ORIGINAL_ZO_STEP},
           "results": {n: [] for n in a.only}}
    order = [s for s in ("paper", "demo") if s in a.scales]     # paper first: demo cells may reuse them
    for name in a.only:
        for size in a.sizes:
            for shot in SHOTS.get(name, (None,)):
                done = {}
                for scale in order:
                    cfg = scales[scale][0]
                    settings = settings_of(cfg, name)
                    key = json.dumps(settings, sort_keys=True)
                    head = {"scale": scale, "image_size": size, "settings": settings}
                    what = f"{name} {scale} {size}x{size}" + (f" {shot}-shot" if shot else "")
                    if heavy(name, scale, size, device, a.quick) and not a.heavy:
                        cell = {**head, "skipped": ("paper-scale API visit with --quick on the CPU" if size <= 32
                                                    else "paper-scale API visit above 32x32 on the CPU: minutes "
                                                         "and ~3 GB of RAM at 84x84") + "; --heavy runs it"}
                        print(f"[bench] {what}: skipped (--heavy runs it)", file=sys.stderr)
                    elif key in done:
                        cell = {**done[key], **head, "same_as": done[key]["scale"]}
                        print(f"[bench] {what}: same settings as {done[key]['scale']}, not rerun", file=sys.stderr)
                    else:
                        print(f"[bench] {what} ...", file=sys.stderr, flush=True)
                        try:
                            cell = {**head, **run_cell(name, cfg, size, device, plan, shot)}
                        except (RuntimeError, MemoryError) as e:    # e.g. out of memory: record it, go on
                            cell = {**head, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                        done[key] = cell
                        print(f"[bench] {what}: " + (cell.get("error") or f"{cell['seconds']:.3f} s (median of "
                              f"{cell['reps']}), cell {cell['cell_wall_s']} s, load {cell['loadavg_after'][:1]}"),
                              file=sys.stderr, flush=True)
                    doc["results"][name].append(cell)
                    doc["wall_seconds"] = round(time.perf_counter() - t_start, 1)
                    doc["loadavg_end"] = m.loadavg()
                    write_json(doc, a.out)      # after every cell: an interrupted run keeps what it measured
    for name in a.only:     # tables read best demo first, then paper; small images first
        doc["results"][name].sort(key=lambda c: (c["scale"] != "demo", c["image_size"], c.get("shot") or 0))
    doc["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    doc["loadavg_end"] = m.loadavg()
    write_json(doc, a.out)
    print(f"[bench] {doc['wall_seconds']:.0f} s; wrote {a.out}", file=sys.stderr)
    return doc


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.estimate:
        import torch

        from bench.estimate import estimate, render
        if a.threads:
            torch.set_num_threads(a.threads)
        doc = estimate(a.main_flags, device_of(a.device), visits=a.visits, quick=a.quick)
        if a.out != parser_default_out():
            write_json(doc, a.out)
        print(render(doc))
        return
    if a.from_file:
        try:
            with open(a.from_file) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BidfError(f"cannot read {a.from_file} ({e}); run `python -m bench` to make it") from None
    else:
        try:
            doc = measure(a)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; the cells measured so far are in {a.out}") from None
    if a.markdown:
        from bench.report import markdown
        print(markdown(doc))
    else:
        print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    from core.cli import run
    run(main)
