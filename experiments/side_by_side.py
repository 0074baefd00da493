#!/usr/bin/env python
"""The original BiDf-MKD and this project's faithful default, side by side, end to end: the same data,
the same API pool, the same flags, several seeds each; writes results/side_by_side.json.

    python experiments/side_by_side.py                 # every step; rerunning skips what is done
    python experiments/side_by_side.py --steps collect # only re-read the finished runs into the JSON
    python experiments/side_by_side.py --dry_run       # print the commands, run nothing

Run it as a command with the project's Python (tests import no experiment). It needs an exported tree of
the original repository (`Egg-Hu/BiDf-MKD`, `--orig`) and the CPU harness that runs it unmodified
(`--harness`: run.py, cpu_patch.py). Nothing of the original is copied here: this file only starts it.

Steps (everything lives under --work, outside the repository):
1. data: the demo dataset with 600 images per class (`python -m dataset.demo`), laid out as CIFAR-FS twice
   through symlinks to the same image folders: <work>/proj_root/cifar100/... for main.py (split CSVs
   written by this project's `write_cifar100_filelist.py`: classes and files sorted), and
   <work>/orig_root/DFL2Ldata/cifar100/... for the original (split CSVs in the original's format,
   `filename,label` with paths relative to the original's working folder, `../DFL2Ldata/cifar100/...`,
   written here with the very rows of the project's CSVs, in the same order: so both read the same
   class ids and the same per-class file order; the original's own write_file/*.py would list in
   os.listdir order). Both orders are checked to agree.
2. pool: ONE pool of 10 conv4 APIs pretrained by the ORIGINAL (`mainKD.py --pretrain` through the
   harness, ORIG_PRETRAIN_EPOCHS epochs, its own setup_seed(2022)) into <work>/pool; both sides use it.
3. runs: for each seed, the original (`mainKD.py` through the harness, its hard-coded
   `setup_seed(2022)` replaced at start-up by `setup_seed(<seed>)`: see `orig_seeded` below; no file of
   the original is edited) and `main.py` (the faithful default) with the same flags and `--seed <seed>`.
   One thread per run, at most --jobs runs at a time. Each original run gets its own working folder
   (a folder of symlinks to the original's files), because the original writes its task memory to
   ./datapoolkd/<flags> and deletes it at start: two runs in one folder would destroy each other's.
4. collect: both protocols per run, API visits and queries, wall seconds, provenance, the spread
   across seeds -> --out.

Internal: `side_by_side.py _orig_seeded SEED -- SCRIPT [flags]` is the wrapper that runs the harness
with the seed replaced (called by step 3).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("meta_train", "meta_val", "meta_test")
ORIG_COMMIT = "2a08d26"

# The small API-SS configuration of the harness README (the issue's): every flag has the same name on
# both sides; main.py takes all of them with the original's meaning.
FLAGS = ["--multigpu", "0", "--gpu", "0", "--dataset", "cifar100",
         "--way_train", "5", "--num_sup_train", "1", "--num_qur_train", "15",
         "--way_test", "5", "--num_sup_test", "1", "--num_qur_test", "15",
         "--backbone", "conv4", "--episode_train", "200", "--episode_test", "100",
         "--inner_update_num", "5", "--test_inner_update_num", "10", "--start_id", "1",
         "--inner_lr", "0.01", "--outer_lr", "0.001", "--episode_batch", "4",
         "--val_interval", "40", "--save_interval", "2000",
         "--num_sup_kd", "5", "--num_qur_kd", "11", "--inner_update_num_kd", "5",
         "--adv", "1", "--advstartit", "10", "--way_pretrain", "5", "--pre_backbone", "conv4",
         "--generate_interval", "5", "--generate_iterations", "20", "--Glr", "0.001",
         "--ZO", "--mu", "0.005", "--q", "10", "--numsplit", "1", "--APInum", "10"]
PRETRAIN_FLAGS = ["--multigpu", "0", "--gpu", "0", "--dataset", "cifar100", "--way_pretrain", "5",
                  "--pre_backbone", "conv4", "--backbone", "conv4", "--pretrain", "--APInum", "10"]


def flag(name: str, flags=FLAGS) -> str:
    return flags[flags.index(name) + 1]


# ------------------------------------------------------------------ the seeded wrapper (step 3)

def orig_seeded(seed: int, harness: str, argv: list[str]) -> None:
    """Run the harness's run.py with `black_box_tool.setup_seed` replaced by one that seeds with `seed`.

    run.py applies its CPU patches, chdirs to $ORIG_DIR, puts it first on sys.path and then calls
    runpy.run_path(mainKD.py); the hook below runs at that moment (the original's modules importable),
    imports black_box_tool and swaps its setup_seed before mainKD.py does
    `from black_box_tool import setup_seed` and calls setup_seed(2022). The replacement calls the
    original function, with the chosen seed."""
    import importlib.util
    import runpy

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]   # no module of ours shadows the original's
    spec = importlib.util.spec_from_file_location("orig_harness_run", os.path.join(harness, "run.py"))
    run_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_mod)
    real_run_path = runpy.run_path

    def run_path(path, *a, **k):
        runpy.run_path = real_run_path
        import black_box_tool
        original_setup_seed = black_box_tool.setup_seed

        def setup_seed(requested):
            print(f"[side_by_side] setup_seed({requested}) -> setup_seed({seed})", flush=True)
            original_setup_seed(seed)
        black_box_tool.setup_seed = setup_seed
        return real_run_path(path, *a, **k)

    runpy.run_path = run_path
    sys.argv = [os.path.join(harness, "run.py")] + argv
    run_mod.main()


# ------------------------------------------------------------------ helpers

def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sh(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, **kw).stdout.strip()


def run_logged(cmd: list[str], log: str, env: dict, cwd: str, dry: bool) -> tuple[int, float]:
    print(f"[{utc_now()}] $ {' '.join(cmd)}  > {log}", flush=True)
    if dry:
        return 0, 0.0
    t0 = time.time()
    with open(log, "w") as f:
        f.write(f"# {utc_now()} cwd={cwd}\n# {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.time() - t0


def write_json(obj, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def symlink(target: str, link: str) -> None:
    if os.path.islink(link):
        if os.readlink(link) == target:
            return
        os.unlink(link)
    os.symlink(target, link)


def base_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.pop("PYTHONPATH", None)
    return env


# ------------------------------------------------------------------ step 1: data

def class_order(rows: list[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys(label for _, label in rows))


def read_rows(path: str) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        r = csv.reader(f)
        head = next(r)
        assert head == ["filename", "label"], (path, head)
        return [(a, b) for a, b in r]


def make_data(a, dry: bool) -> dict:
    w = a.work
    data, proj, orig = os.path.join(w, "data"), os.path.join(w, "proj_root"), os.path.join(w, "orig_root", "DFL2Ldata")
    marker = os.path.join(w, "data_done.json")
    if os.path.isfile(marker):
        return read_json(marker)
    os.makedirs(data, exist_ok=True)
    env = base_env(a.threads)
    rc, secs = run_logged([sys.executable, "-m", "dataset.demo", "--data_root", data, "--images_per_class",
                           str(a.images_per_class)], os.path.join(w, "logs", "data.log"), dict(env, PYTHONPATH=ROOT),
                          ROOT, dry)
    if rc:
        sys.exit(f"demo generation failed; see {w}/logs/data.log")
    for root in (os.path.join(proj, "cifar100"), os.path.join(orig, "cifar100")):
        os.makedirs(root, exist_ok=True)
        for s in SPLITS:
            symlink(os.path.join(data, "demo", s), os.path.join(root, s))
    # this project's CSVs: its own script (sorted classes and files, paths relative to --data_root)
    rc, _ = run_logged([sys.executable, "write_cifar100_filelist.py", "--data_root", proj],
                       os.path.join(w, "logs", "filelist.log"), dict(env, PYTHONPATH=ROOT), ROOT, dry)
    if rc:
        sys.exit(f"write_cifar100_filelist.py failed; see {w}/logs/filelist.log")
    if dry:
        return {}
    # the original's CSVs: its format (header filename,label; csv.writer's default \r\n; paths as its
    # write_file/write_cifar100_filelist.py writes them, relative to its working folder), our rows' order
    os.makedirs(os.path.join(orig, "cifar100", "split"), exist_ok=True)
    info = {"images_per_class": a.images_per_class, "splits": {}}
    for s in SPLITS:
        rows = read_rows(os.path.join(proj, "cifar100", "split", f"{s}.csv"))
        orig_rows = [("../DFL2Ldata/" + f, label) for f, label in rows]
        with open(os.path.join(orig, "cifar100", "split", f"{s}.csv"), "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["filename", "label"])
            wr.writerows(orig_rows)
        # both readers: class ids in the order of first appearance, files in row order
        back = read_rows(os.path.join(orig, "cifar100", "split", f"{s}.csv"))
        assert class_order(back) == class_order(rows)
        assert [f[len("../DFL2Ldata/"):] for f, _ in back] == [f for f, _ in rows]
        counts = {c: 0 for c in class_order(rows)}
        for _, c in rows:
            counts[c] += 1
        assert set(counts.values()) == {a.images_per_class}, (s, set(counts.values()))
        assert all(os.path.isfile(os.path.join(proj, f)) for f, _ in rows[:: max(1, len(rows) // 50)])
        info["splits"][s] = {"classes": len(counts), "images": len(rows),
                             "first_classes": class_order(rows)[:3]}
    info["class_order"] = "sorted (this project's write_cifar100_filelist.py); the original's CSVs written " \
                          "by this script from the same rows, same order (checked)"
    write_json(info, marker)
    return info


def shadow_tree(a, name: str) -> str:
    """<work>/orig_runs/<name>/BiDf-MKD: symlinks to the original's files (its code, unedited), a working
    folder of its own (./datapoolkd), with ../DFL2Ldata -> the original-format data root."""
    base = os.path.join(a.work, "orig_runs", name)
    tree = os.path.join(base, "BiDf-MKD")
    os.makedirs(tree, exist_ok=True)
    for entry in sorted(os.listdir(a.orig)):
        if entry in ("datapoolkd", "pretrained_blackbox", "__pycache__") or entry.startswith("."):
            continue
        symlink(os.path.join(a.orig, entry), os.path.join(tree, entry))
    symlink(os.path.join(a.work, "orig_root", "DFL2Ldata"), os.path.join(base, "DFL2Ldata"))
    return tree


def orig_env(a, tree: str, threads: int, **extra) -> dict:
    env = base_env(threads)
    env.update(ORIG_DIR=tree, ORIG_THREADS=str(threads), ORIG_NUM_WORKERS="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------ step 2: the pool

def pool_folder(a) -> str:
    return os.path.join(a.work, "pool", "cifar100", "conv4", "meta_train", "5way", "model")


def make_pool(a, dry: bool) -> dict:
    marker = os.path.join(a.work, "pool_done.json")
    if os.path.isfile(marker):
        return read_json(marker)
    tree = shadow_tree(a, "pretrain")
    n = int(flag("--APInum", PRETRAIN_FLAGS))
    folder = pool_folder(a)
    if os.path.isdir(folder):
        for f in os.listdir(folder):
            os.unlink(os.path.join(folder, f))
    log = os.path.join(a.work, "logs", "pool_pretrain.log")
    cmd = [sys.executable, os.path.join(a.harness, "run.py"), "mainKD.py", *PRETRAIN_FLAGS,
           "--pretrained_path_prefix", os.path.join(a.work, "pool")]
    rc, secs = run_logged(cmd, log, orig_env(a, tree, a.threads, ORIG_PRETRAIN_EPOCHS=a.pretrain_epochs), tree, dry)
    if dry:
        return {}
    text = open(log).read()
    files = sorted(f for f in os.listdir(folder) if f.startswith("model_specific_"))
    # the original ends a successful pretraining with `raise NotImplementedError` (exit status 1)
    if rc not in (0, 1) or "pretrain end!" not in text or len(files) != n:
        sys.exit(f"pretraining failed (rc {rc}, {len(files)} files); see {log}")
    accs = [float(x) for x in re.findall(r"teacher\d+_acc: tensor\(([\d.]+)\)", text)] or \
           [float(x) for x in re.findall(r"teacher\d+_acc: ([\d.]+)", text)]
    classes = [json.loads(c) for c in re.findall(r"^(\[\d+(?:, \d+)*\])$", text, re.M)]
    info = {"folder": folder, "apis": n, "epochs": a.pretrain_epochs, "by": "the original (mainKD.py --pretrain, "
            "through the harness, its setup_seed(2022))", "command": " ".join(cmd[1:]),
            "env": f"ORIG_PRETRAIN_EPOCHS={a.pretrain_epochs} ORIG_THREADS={a.threads} ORIG_NUM_WORKERS=0",
            "held_out_acc_best_epoch_printed": accs, "classes": classes, "wall_seconds": round(secs, 1),
            "note": "the original saves a reference to the live state_dict, so each file holds the last "
                    "epoch's weights while the printed accuracy is the best epoch's (docs/differences.md C2); "
                    "both sides load the same files"}
    write_json(info, marker)
    return info


# ------------------------------------------------------------------ step 3: the runs

def run_dir(a, side: str, seed: int) -> str:
    return os.path.join(a.work, "runs", f"{side}_seed{seed}")


def orig_command(a, seed: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "_orig_seeded", str(seed), "--harness", a.harness, "--",
            "mainKD.py", *FLAGS, "--pretrained_path_prefix", os.path.join(a.work, "pool")]


def proj_command(a, seed: int) -> list[str]:
    return [sys.executable, "main.py", *FLAGS, "--data_root", os.path.join(a.work, "proj_root"),
            "--pretrained_path_prefix", os.path.join(a.work, "pool"), "--seed", str(seed),
            "--task_exec", "sequential", "--out_dir", run_dir(a, "faithful", seed)]


def git_state() -> dict:
    return {"commit": sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT),
            "dirty": sh(["git", "status", "--short"], cwd=ROOT).splitlines()}


def run_one(a, side: str, seed: int, dry: bool) -> None:
    d = run_dir(a, side, seed)
    done = os.path.join(d, "done.json")
    if os.path.isfile(done) and read_json(done).get("rc") == 0:
        print(f"{side} seed {seed}: done already ({d})", flush=True)
        return
    started, git = utc_now(), git_state()
    if side == "original":
        os.makedirs(d, exist_ok=True)
        tree = shadow_tree(a, f"seed{seed}")
        timing = os.path.join(d, "timing.jsonl")
        if os.path.exists(timing):
            os.unlink(timing)
        cmd = orig_command(a, seed)
        env = orig_env(a, tree, 1, ORIG_TIMING_LOG=timing)
        rc, secs = run_logged(cmd, os.path.join(d, "stdout.log"), env, tree, dry)
    else:
        cmd = proj_command(a, seed)
        if os.path.isdir(d):
            cmd.append("--overwrite")        # an unfinished earlier attempt
        os.makedirs(os.path.dirname(d), exist_ok=True)
        log = d + ".log"
        rc, secs = run_logged(cmd, log, dict(base_env(1), PYTHONPATH=ROOT), ROOT, dry)
        if not dry and os.path.isdir(d):
            shutil.move(log, os.path.join(d, "stdout.log"))
    if dry:
        return
    write_json({"rc": rc, "wall_seconds": round(secs, 1), "started": started, "finished": utc_now(),
                "command": cmd, "git": git}, done)
    print(f"[{utc_now()}] {side} seed {seed}: rc {rc}, {secs:.0f}s", flush=True)


def make_runs(a, dry: bool) -> None:
    jobs = [(side, s) for s in a.seeds for side in ("original", "faithful")]
    with ThreadPoolExecutor(max_workers=a.jobs) as ex:
        for f in [ex.submit(run_one, a, side, s, dry) for side, s in jobs]:
            f.result()


# ------------------------------------------------------------------ step 4: collect

def spread(xs: list[float]) -> dict:
    return {"n": len(xs), "mean": round(statistics.mean(xs), 3),
            "sd": round(statistics.stdev(xs), 3) if len(xs) > 1 else None,
            "min": round(min(xs), 3), "max": round(max(xs), 3)}


def collect_original(a, seed: int) -> dict | None:
    d = run_dir(a, "original", seed)
    if not os.path.isfile(os.path.join(d, "done.json")):
        return None
    done = read_json(os.path.join(d, "done.json"))
    text = open(os.path.join(d, "stdout.log"), errors="replace").read()
    evals = [{"meta_iter": int(i), "meta_test": {"acc": round(float(acc), 4), "ci": round(float(ci), 4)}}
             for i, acc, ci in re.findall(r"^(\d+) test acc: ([\d.eE+-]+) \+- ([\d.eE+-]+)", text, re.M)]
    best = None
    for e in evals:                    # the original's rule: strictly better replaces (first maximum)
        if best is None or e["meta_test"]["acc"] > best["meta_test"]["acc"]:
            best = e
    printed = re.findall(r"^(\d+) best test acc: ([\d.eE+-]+) \+- ([\d.eE+-]+)", text, re.M)
    synth = []
    tpath = os.path.join(d, "timing.jsonl")
    if os.path.isfile(tpath):
        synth = [e for e in map(json.loads, filter(str.strip, open(tpath))) if e["ev"] == "synth"]
    q, kd_steps = int(flag("--q")), int(flag("--inner_update_num_kd"))
    sup = int(flag("--way_pretrain")) * int(flag("--num_sup_kd"))
    qry = int(flag("--way_pretrain")) * int(flag("--num_qur_kd"))
    visits = len(synth) // 2            # mainKD calls synthesize twice per visit: support, then query
    synth_queries = sum(e["n"] * e["iters"] * (e["q"] + 1 if e["ZO"] else 1) for e in synth)
    kd_labels = visits * (sup * kd_steps + qry)   # MamlKD: teacher(support) at each inner step, teacher(query) once
    generate_after = [int(x) for x in re.findall(r"^generate after (\d+)", text, re.M)]
    # the original's memory: PNG files <idx>-<j>.png per class; a class's 21st recovered set wraps idx
    files_per_class = {}
    for folder in glob.glob(os.path.join(a.work, "orig_runs", f"seed{seed}", "BiDf-MKD", "datapoolkd", "*", "support", "*")):
        n = len(os.listdir(folder))
        if n:
            files_per_class[int(os.path.basename(folder))] = n
    return {
        "rc": done["rc"], "completed": bool(evals) and evals[-1]["meta_iter"] == int(flag("--episode_train")) // int(flag("--episode_batch")),
        "protocol_original": dict(best["meta_test"], meta_iter=best["meta_iter"]) if best else None,
        "protocol_original_printed_by_the_original": {"meta_iter": int(printed[-1][0]), "acc": round(float(printed[-1][1]), 4),
                                                       "ci": round(float(printed[-1][2]), 4)} if printed else None,
        "protocol_ours": None,
        "evaluations": evals,
        "api_visits": visits,
        "api_queries": synth_queries + visits * (sup + qry),
        "api_forward_images": synth_queries + kd_labels,
        "generate_after_meta_iters": generate_after,
        "memory": {"classes": len(files_per_class), "images": sum(files_per_class.values()),
                   "max_images_per_class": max(files_per_class.values(), default=0)},
        "wall_seconds": done["wall_seconds"], "started": done["started"], "finished": done["finished"],
        "command": "ORIG_DIR=<work>/orig_runs/seed%d/BiDf-MKD ORIG_THREADS=1 ORIG_NUM_WORKERS=0 OMP_NUM_THREADS=1 "
                   "ORIG_TIMING_LOG=<run>/timing.jsonl " % seed + " ".join(x.replace(a.work, "<work>") for x in done["command"][1:]),
        "log": os.path.join(d, "stdout.log"),
    }


def collect_faithful(a, seed: int) -> dict | None:
    d = run_dir(a, "faithful", seed)
    if not os.path.isfile(os.path.join(d, "summary.json")) or not os.path.isfile(os.path.join(d, "done.json")):
        return None
    done, s = read_json(os.path.join(d, "done.json")), read_json(os.path.join(d, "summary.json"))
    by_task = {}
    for line in open(os.path.join(d, "metrics.jsonl")):
        m = json.loads(line)
        by_task.setdefault(m["task"], {"meta_iter": m["meta_iter"]})[m["split"]] = {"acc": m["acc"], "ci": m["ci"]}
    evals = [by_task[t] for t in sorted(by_task)]
    eb = int(flag("--episode_batch"))
    return {
        "rc": done["rc"], "completed": s.get("tasks") == int(flag("--episode_train")),
        "protocol_original": {"acc": round(s["test_acc_best_on_test (original protocol)"], 4),
                              "ci": round(s["test_ci_best_on_test (original protocol)"], 4),
                              "meta_iter": s["best_on_test_task (original protocol)"] // eb},
        "protocol_ours": {"acc": round(s["test_acc"], 4), "ci": round(s["test_ci"], 4),
                          "val_acc": round(s["val_acc"], 4), "val_ci": round(s["val_ci"], 4),
                          "meta_iter": s["best_task"] // eb},
        "last_test_acc": s.get("last_test_acc"),
        "evaluations": evals,
        "api_visits": s["api_visits"], "api_queries": s["api_queries"],
        "wall_seconds": done["wall_seconds"], "wall_seconds_main_py": s.get("wall_seconds"),
        "started": done["started"], "finished": done["finished"],
        "git_at_start": done["git"],
        "command": "OMP_NUM_THREADS=1 " + " ".join(x.replace(a.work, "<work>") for x in done["command"][1:]),
        "log": os.path.join(d, "stdout.log"),
    }


def welch(x: list[float], y: list[float]) -> dict | None:
    if len(x) < 2 or len(y) < 2:
        return None
    vx, vy = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    if vx + vy == 0:
        return None
    t = (statistics.mean(y) - statistics.mean(x)) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    return {"t": round(t, 3), "df": round(df, 2)}


def compare(runs: dict) -> dict:
    o = {s: r for s, r in runs["original"].items() if r and r["protocol_original"]}
    f = {s: r for s, r in runs["faithful"].items() if r and r["protocol_original"]}
    if not o or not f:
        return {}
    lo = min(r["protocol_original"]["acc"] - r["protocol_original"]["ci"] for r in o.values())
    hi = max(r["protocol_original"]["acc"] + r["protocol_original"]["ci"] for r in o.values())
    oa = [r["protocol_original"]["acc"] for r in o.values()]
    out = {
        "original_envelope_original_protocol": {"low": round(lo, 3), "high": round(hi, 3),
                                                 "what": "from the lowest acc - ci to the highest acc + ci of the original's seeds"},
        "faithful_within_original_envelope": {
            proto: {s: lo <= r[key]["acc"] <= hi for s, r in f.items()}
            for proto, key in (("original_protocol", "protocol_original"), ("ours", "protocol_ours"))},
        "same_seed_intervals_overlap_original_protocol": {
            s: abs(f[s]["protocol_original"]["acc"] - o[s]["protocol_original"]["acc"])
            <= f[s]["protocol_original"]["ci"] + o[s]["protocol_original"]["ci"] for s in f if s in o},
        "mean_difference_faithful_minus_original_original_protocol":
            round(statistics.mean(r["protocol_original"]["acc"] for r in f.values()) - statistics.mean(oa), 3),
        "welch_original_protocol": welch(oa, [r["protocol_original"]["acc"] for r in f.values()]),
    }
    return out


def collect(a) -> dict:
    runs = {"original": {str(s): collect_original(a, s) for s in a.seeds},
            "faithful": {str(s): collect_faithful(a, s) for s in a.seeds}}
    across = {}
    for side, by_seed in runs.items():
        done = [r for r in by_seed.values() if r]
        across[side] = {}
        for proto in ("protocol_original", "protocol_ours"):
            xs = [r[proto]["acc"] for r in done if r.get(proto)]
            if xs:
                across[side][proto] = spread(xs)
        for k in ("api_visits", "api_queries", "wall_seconds"):
            xs = [r[k] for r in done if r.get(k) is not None]
            if xs:
                across[side][k] = spread(xs)
    lscpu = sh(["lscpu"])
    model = next((li.split(":", 1)[1].strip() for li in lscpu.splitlines() if li.startswith("Model name")), "unknown")
    isa = "AVX-512" if "avx512f" in lscpu else ("AVX2" if "avx2" in lscpu else "no AVX2")
    import torch
    data = read_json(os.path.join(a.work, "data_done.json")) if os.path.isfile(os.path.join(a.work, "data_done.json")) else None
    pool = read_json(os.path.join(a.work, "pool_done.json")) if os.path.isfile(os.path.join(a.work, "pool_done.json")) else None
    return {
        "what": "The original BiDf-MKD (Egg-Hu/BiDf-MKD %s, unmodified, through the CPU harness) and this project's "
                "--recipe faithful default, end to end on the same data and the same API pool, %d seeds each, "
                "5-way 1-shot meta-test accuracy (%%) +- 95%% CI over %s tasks." % (ORIG_COMMIT, len(a.seeds), flag("--episode_test")),
        "provenance": {
            "date": utc_now(), "cpu": f"{model} ({isa}), {os.cpu_count()} cores", "lscpu_model_name": model,
            "torch": torch.__version__, "python": sys.version.split()[0],
            "original_commit": ORIG_COMMIT, "original_tree": a.orig, "harness": a.harness,
            "repo_commit": sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT),
            "repo_dirty_files_at_collect": sh(["git", "status", "--short"], cwd=ROOT).splitlines(),
            "command": "python experiments/side_by_side.py " + " ".join(sys.argv[1:]),
            "threads": "one per run (original: ORIG_THREADS=1, OMP_NUM_THREADS=1; main.py: OMP_NUM_THREADS=1, "
                       f"--task_exec sequential), at most {a.jobs} runs at a time, while other jobs shared the machine",
        },
        "configuration": {"flags": " ".join(FLAGS), "seeds": a.seeds,
                          "original_extra": "--pretrained_path_prefix <work>/pool; setup_seed(2022) replaced by setup_seed(seed)",
                          "faithful_extra": "--data_root <work>/proj_root --pretrained_path_prefix <work>/pool --seed S "
                                            "--task_exec sequential (every other setting: the default, --recipe faithful)",
                          "data": data, "pool": pool},
        "protocols": {
            "original": "the best meta_test accuracy over the run's evaluations (every --val_interval tasks; "
                        "the original: new random test tasks at each evaluation; main.py: "
                        "`test_acc_best_on_test (original protocol)`, its fixed test tasks)",
            "ours": "meta_test accuracy of the model chosen on meta_val (summary.json test_acc/test_ci; fixed "
                    "tasks from --eval_seed 0). The original evaluates meta_test only and saves no model: none.",
        },
        "runs": runs,
        "across_seeds": across,
        "comparison": compare(runs),
    }


# ------------------------------------------------------------------ main

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/work/sbs", help="data, pool and runs (outside the repository)")
    p.add_argument("--orig", default="/work/orig/BiDf-MKD", help="exported tree of Egg-Hu/BiDf-MKD " + ORIG_COMMIT)
    p.add_argument("--harness", default="/work/shared/original-harness")
    p.add_argument("--seeds", default="2022,2023,2024")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="threads of the data generation and the pretraining")
    p.add_argument("--images_per_class", type=int, default=600)
    p.add_argument("--pretrain_epochs", type=int, default=10)
    p.add_argument("--steps", default="data,pool,runs,collect")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "side_by_side.json"))
    p.add_argument("--dry_run", action="store_true")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.work, a.orig, a.harness = map(os.path.abspath, (a.work, a.orig, a.harness))
    if os.path.commonpath([a.work, ROOT]) == ROOT:
        p.error("--work must lie outside the repository")
    a.steps = a.steps.split(",")
    return a


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_orig_seeded":
        argv = sys.argv[2:]         # SEED --harness DIR -- SCRIPT [flags]
        if len(argv) < 5 or argv[1] != "--harness" or argv[3] != "--":
            sys.exit("usage: side_by_side.py _orig_seeded SEED --harness DIR -- SCRIPT [flags]")
        return orig_seeded(int(argv[0]), argv[2], argv[4:])
    a = parse()
    os.makedirs(os.path.join(a.work, "logs"), exist_ok=True)
    for need in (os.path.join(a.orig, "mainKD.py"), os.path.join(a.harness, "run.py")):
        if not os.path.isfile(need):
            sys.exit(f"{need} not found")
    if "data" in a.steps:
        make_data(a, a.dry_run)
    if "pool" in a.steps:
        make_pool(a, a.dry_run)
    if "runs" in a.steps:
        make_runs(a, a.dry_run)
    if "collect" in a.steps and not a.dry_run:
        res = collect(a)
        write_json(res, a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
