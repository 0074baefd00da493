"""The ablation of the method's choices on the demo: the faithful default, each variant alone, all the
project's earlier variants together, and the improved recipe.

    python -m experiments.ablation                       # every row (bash scriptskd/ablation.sh does this)
    python -m experiments.ablation --rows faithful,init_torch --jobs 2 --out runs/ablation

Each row is `main.py --preset demo <its flags> --seed S` for each of --seeds (400 tasks, model chosen on meta_val), then a 600-task
5-way 1-shot meta-test evaluation of its best.pth. Rows run side by side, one thread each (`--jobs`,
default: the number of cores). Writes <out>/ablation.json and <out>/ablation.md (the table of
docs/differences.md); rerunning the same command resumes and skips finished rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (main.py flags, pool). Pools: "faithful" (the original's pretraining) or "api_augment"
# (APIs pretrained with crop/flip, as the project did before).
ROWS = {
    "faithful": ([], "faithful"),
    "boundary_student_perturbed": (["--boundary_student", "perturbed"], "faithful"),
    "no_kd_augment": (["--no-kd_augment"], "faithful"),
    "zo_space_pixel": (["--zo_space", "pixel"], "faithful"),
    "inversion_augment_image": (["--inversion_augment", "image"], "faithful"),
    "init_torch": (["--init", "torch"], "faithful"),
    "project_api_pool": ([], "api_augment"),
    "all_project_variants": (["--boundary_student", "perturbed", "--no-kd_augment", "--zo_space", "pixel",
                              "--inversion_augment", "image", "--init", "torch"], "api_augment"),
    "init_torch_no_kd_augment": (["--init", "torch", "--no-kd_augment"], "faithful"),
    "improved": (["--recipe", "improved"], "faithful"),
    # the switches of the original's last differences: each the project's earlier behaviour, alone
    "kd_loss_kl": (["--kd_loss", "kl"], "faithful"),
    "keep_best_image": (["--keep_best", "image"], "faithful"),
    "api_output_probs": (["--api_output", "probs"], "faithful"),
    "memory_quantize_round": (["--memory_quantize", "round"], "faithful"),
    # additions to the paper (issue "Learn more from every query"), each alone on the faithful default
    "replay_augment": (["--replay_augment"], "faithful"),
    # the improved recipe's recovery switches without its initialisation: the gain of recovery alone
    "recovery_switches": (["--keep_best", "image", "--api_output", "probs"], "faithful"),
    "zo_resolution_8": (["--zo_resolution", "8"], "faithful"),
    "zo_resolution_4": (["--zo_resolution", "4"], "faithful"),
    "prior_tv": (["--prior_tv", "100"], "faithful"),
    "prior_diversity": (["--prior_diversity", "2"], "faithful"),
    "replay_mix": (["--replay_mix", "0.5"], "faithful"),
    "memory_labels_api": (["--memory_labels", "api"], "faithful"),
    "kd_replay": (["--kd_replay", "0.25"], "faithful"),
    # the balance of visits and replay: a visit at a quarter of the queries (low-resolution directions keep
    # the estimate's fidelity at q 4), a visit whenever a meta-batch does not improve, within the faithful run's queries
    "cheap_visits": (["--zo_resolution", "4", "--q", "4", "--generate_interval", "1", "--query_budget", "841000"],
                     "faithful"),
    # recovery by screening a procedural prior: the same queries a visit, spent on labels instead of gradients
    "screen": (["--recovery", "screen"], "faithful"),
    # --recipe improved before it took --recovery screen, and with screening at an inversion's count
    "improved_inversion": (["--init", "torch", "--keep_best", "image", "--api_output", "probs"], "faithful"),
    "improved_screen_full": (["--init", "torch", "--keep_best", "image", "--api_output", "probs", "--recovery",
                              "screen"], "faithful"),
    "screen_quarter": (["--recovery", "screen", "--screen_candidates", "210"], "faithful"),
    "screen_kl": (["--recovery", "screen", "--kd_loss", "kl"], "faithful"),
    # the balance of visits and replay with screening: a visit at a quarter of the queries whenever a meta-batch
    # does not improve, within the fewest queries a faithful demo run spent (seed 2023's)
    "screen_cheap": (["--recovery", "screen", "--screen_candidates", "210", "--generate_interval", "1",
                      "--query_budget", "756900"], "faithful"),
    "screen_cheap_memory": (["--recovery", "screen", "--screen_candidates", "210", "--generate_interval", "1",
                             "--query_budget", "756900", "--screen_memory", "60"], "faithful"),
    # many cheap visits with no budget: 50 candidates per image (5,100 queries a visit), a visit whenever a
    # meta-batch does not improve: at most 100 visits in a 400-task demo run, 510,000 queries
    "improved_screen_frequent": (["--init", "torch", "--keep_best", "image", "--api_output", "probs", "--recovery",
                                  "screen", "--screen_candidates", "50", "--generate_interval", "1"], "faithful"),
    "improved_kl": (["--init", "torch", "--keep_best", "image", "--api_output", "probs", "--recovery", "screen",
                     "--screen_candidates", "210", "--kd_loss", "kl"], "faithful"),
    # the improved recipe's own ends of the gap: its untrained meta model, and MAML on the real meta-train images
    "improved_random_init": (["--recipe", "improved", "--baseline", "random_init"], "faithful"),
    "improved_maml_real": (["--recipe", "improved", "--baseline", "maml_real"], "faithful"),
    # and what the screening already answered, kept: three times the sets' images per class and visit
    "screen_memory": (["--recovery", "screen", "--screen_memory", "60"], "faithful"),
    # screening a textured prior: leaves of stripes and checkerboards with pixel noise
    "screen_textured": (["--recovery", "screen", "--screen_prior", "textured"], "faithful"),
    "screen_textured_spread": (["--recovery", "screen", "--screen_prior", "textured", "--screen_spread", "5"],
                               "faithful"),
    "screen_textured_kl": (["--recovery", "screen", "--screen_prior", "textured", "--kd_loss", "kl"], "faithful"),
    "screen_textured_kl_replay_augment": (["--recovery", "screen", "--screen_prior", "textured", "--kd_loss", "kl",
                                           "--replay_augment"], "faithful"),
    "screen_textured_kl_probs": (["--recovery", "screen", "--screen_prior", "textured", "--kd_loss", "kl",
                                  "--api_output", "probs"], "faithful"),
    # --recipe improved before it took the textured prior
    "improved_leaves": (["--init", "torch", "--keep_best", "image", "--api_output", "probs", "--recovery", "screen",
                         "--screen_candidates", "210"], "faithful"),
    # the faithful default's own ends of the random-to-real gap (the original's initialisation)
    "faithful_random_init": (["--baseline", "random_init"], "faithful"),
    "faithful_maml_real": (["--baseline", "maml_real"], "faithful"),
    # replaying past the visits (B26): 800 tasks, the visits capped at the fewest queries a faithful demo run
    # spent (seed 2023's, 9 visits), so every task past the cap replays the memory; the same for the faithful
    # default, and MAML on the real images for 800 tasks (the gap's end at that length)
    "screen_textured_long": (["--recovery", "screen", "--screen_prior", "textured", "--episode_train", "800",
                              "--query_budget", "756900"], "faithful"),
    "faithful_long": (["--episode_train", "800", "--query_budget", "756900"], "faithful"),
    "screen_long": (["--recovery", "screen", "--episode_train", "800", "--query_budget", "756900"], "faithful"),
    "faithful_maml_real_long": (["--baseline", "maml_real", "--episode_train", "800"], "faithful"),
    # the improved recipe replaying twice as long, its visits capped at the most its 400-task runs spent
    "improved_long": (["--recipe", "improved", "--episode_train", "800", "--query_budget", "232100"], "faithful"),
    "improved_maml_real_long": (["--recipe", "improved", "--baseline", "maml_real", "--episode_train", "800"],
                                "faithful"),
    "before_faithful_switches": (["--kd_loss", "kl", "--keep_best", "image", "--api_output", "probs",
                                  "--memory_quantize", "round"], "faithful"),
}
SEED = 2022     # main.py's default: a row run with it keeps the folder name of the row
POOLS = {"faithful": [], "api_augment": ["--api_augment", "--init", "torch"]}


def processor() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(li.split(":", 1)[1].strip() for li in out.splitlines() if li.startswith("Model name"))
        flags = next((li for li in out.splitlines() if li.startswith("Flags")), "")
        isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
        return f"{model} ({isa}), {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def _run(cmd: list[str], log: str, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"`python {' '.join(cmd)}` failed; see {log}")


def run_main(tag: str, flags: list[str], pool: str, out: str, data_root: str, test_tasks: int, seed: int) -> dict:
    """`main.py --preset demo <flags> --seed S` on the pool at `pool` into <out>/<tag>, then the 600-task
    (test_tasks) 1-shot evaluation of its best.pth into <out>/eval/<tag>; skips what is finished."""
    run, ev = os.path.join(out, tag), os.path.join(out, "eval", tag)
    log = os.path.join(out, f"{tag}.log")
    t0 = time.time()
    common = ["--preset", "demo", "--data_root", data_root]
    if not os.path.isfile(os.path.join(run, "summary.json")):
        _run(["main.py", *common, *flags, "--seed", str(seed), "--pretrained_path_prefix", pool, "--out_dir", run,
              "--resume"], log, 1)
    if not os.path.isfile(os.path.join(ev, "summary.json")):
        _run(["main.py", *common, *flags, "--evaluate", os.path.join(run, "best.pth"), "--num_sup_test", "1",
              "--episode_test", str(test_tasks), "--out_dir", ev, "--resume"], log, 1)
    train, test = (json.load(open(os.path.join(d, "summary.json"))) for d in (run, ev))
    return {"seed": seed, "flags": " ".join(flags), "acc": round(test["test_acc"], 2), "ci": round(test["test_ci"], 2),
            "api_queries": train["api_queries"], "api_visits": train["api_visits"], "chosen_task": train["best_task"],
            "train_seconds": train["wall_seconds"], "this_call_seconds": round(time.time() - t0, 1)}


def run_row(name: str, out: str, data_root: str, test_tasks: int, seed: int = SEED) -> dict:
    flags, pool = ROWS[name]
    tag = name if seed == SEED else f"{name}_seed{seed}"
    r = run_main(tag, flags, os.path.join(out, f"pool_{pool}"), out, data_root, test_tasks, seed)
    return {"row": name, **r, "pool": " ".join(POOLS[pool]) or "(defaults)"}


def markdown(rows: list[dict], meta: dict) -> str:
    """The rows, each against the faithful row of its seed."""
    bases = {r["seed"]: r for r in rows if r["row"] == "faithful"}
    lines = ["| row | seed | main.py flags | APIs pretrained with | 5-way 1-shot (%) | vs faithful | API queries | "
             "visits | training s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = bases.get(r["seed"])
        if base is None or r is base:
            vs = "—"
        else:
            d = r["acc"] - base["acc"]
            apart = abs(d) > r["ci"] + base["ci"]
            vs = f"{d:+.2f}{' (CIs apart)' if apart else ''}"
        flags = f"`{r['flags']}`" if r["flags"] else "(defaults)"
        pool = f"`{r['pool']}`" if r["pool"] != "(defaults)" else r["pool"]
        lines.append(f"| {r['row']} | {r['seed']} | {flags} | {pool} | {r['acc']:.2f} ± {r['ci']:.2f} | {vs} | "
                     f"{r['api_queries']:,} | {r['api_visits']} | {r['train_seconds']:.0f} |")
    lines += ["", f"Demo preset (`--preset demo`), model chosen on meta_val; 5-way 1-shot meta-test accuracy "
                  f"± 95% CI over {meta['test_tasks']} tasks. Measured {meta['date']} on {meta['processor']}, "
                  f"{meta['jobs']} rows side by side, one thread each (training seconds overlap). "
                  f"Command: `{meta['command']}`."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--data_root", default="./DFL2Ldata")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="rows run side by side, one thread each")
    p.add_argument("--test_tasks", type=int, default=600)
    p.add_argument("--seeds", default=str(SEED), help="comma-separated --seed values; every row runs with each")
    p.add_argument("--list", action="store_true", help="print the rows (main.py flags, pool flags) as JSON; run nothing")
    a = p.parse_args(argv)
    if a.list:
        print(json.dumps({name: {"flags": f, "pool": POOLS[pool]} for name, (f, pool) in ROWS.items()}))
        return []
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose among {', '.join(ROWS)}")
    out = os.path.abspath(a.out)
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    data_root = os.path.abspath(a.data_root)
    _run(["-m", "dataset.demo", "--data_root", data_root], os.path.join(out, "data.log"), 2)
    for pool in sorted({ROWS[r][1] for r in rows}):
        print(f"[ablation] pool {pool}", flush=True)
        _run(["pretrain.py", "--preset", "demo", "--data_root", data_root, *POOLS[pool], "--no-tensorboard",
              "--pretrained_path_prefix", os.path.join(out, f"pool_{pool}")], os.path.join(out, f"pool_{pool}.log"),
             os.cpu_count() or 1)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    with ThreadPoolExecutor(max(1, a.jobs)) as ex:
        futures = [ex.submit(run_row, r, out, data_root, a.test_tasks, s) for s in seeds for r in rows]
        table = []
        for f in futures:
            table.append(f.result())
            r = table[-1]
            print(f"[ablation] {r['row']} seed {r['seed']}: {r['acc']:.2f} ± {r['ci']:.2f}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "processor": processor(), "jobs": a.jobs, "test_tasks": a.test_tasks,
            "command": "python -m experiments.ablation" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()}
    from core.io import atomic_json, atomic_text
    atomic_json({"rows": table, **meta}, os.path.join(out, "ablation.json"))
    atomic_text(markdown(table, meta), os.path.join(out, "ablation.md"))
    print(markdown(table, meta))
    return table


if __name__ == "__main__":
    main()
