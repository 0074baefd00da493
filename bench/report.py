"""Markdown tables from the bench's JSON document (`python -m bench --markdown [--from results.json]`)."""
from __future__ import annotations

# The original implementation's ZO step, measured on this machine kind before this project existed
# (2 threads, 5 classes x 30 images, 32x32, conv4 API, q 100, numsplit 5). Reference figures.
ORIGINAL_ZO_STEP = {"seconds_per_step": [7.6, 9.1], "images_per_s": [1700, 2000], "peak_mem_gb": 1.9,
                    "peak_mem_gb_numsplit_1": 5.4, "api_forward_share": [0.70, 0.80],
                    "source": "the original implementation on this machine kind (2 threads), "
                              "5 classes x 30 images, 32x32, conv4 API, q 100, numsplit 5"}


def _mb(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1024:.2f} GB" if v >= 1024 else f"{v:.0f} MB"


def _s(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _load(c) -> str:
    a = c.get("loadavg_before") or []
    return f"{a[0]:.1f}" if a else "-"


def _scale(c) -> str:
    return c.get("label", c["scale"])


def _rows(cells, header, row) -> list[str]:
    """One row per measured cell; a cell another scale shares (same settings, not rerun) is one
    row labelled with both scales."""
    shared = {(c["image_size"], c.get("shot")): c["scale"] for c in cells if c.get("same_as")}
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in cells:
        if c.get("same_as"):
            continue
        other = shared.get((c["image_size"], c.get("shot")))
        if other:
            c = {**c, "label": " = ".join(sorted([c["scale"], other]))}
        if "error" in c or "skipped" in c:
            why = f"error: {c['error']}" if "error" in c else f"skipped: {c['skipped']}"
            out.append("| " + " | ".join([_scale(c), f"{c['image_size']}x{c['image_size']}", why]
                                         + [""] * (len(header) - 3)) + " |")
        else:
            out.append("| " + " | ".join(str(v) for v in row(c)) + " |")
    return out


def _mem(c) -> str:
    return f"{_mb(c['peak_mem_mb'])} ({_mb(c['peak_mem_delta_mb'])})"


def markdown(doc: dict) -> str:
    env, res, st = doc["environment"], doc["results"], doc["settings"]
    dev = env["device"] + (f" ({env['gpu']})" if "gpu" in env else f" ({env['cpu']}, {env['cpu_count']} cores)")
    lines = [f"Measured {doc['date']} with `{doc['command']}` ({doc['wall_seconds']:.0f} s in all).",
             "",
             f"Device {dev}; torch {env['torch']}, {env['torch_threads']} threads, "
             f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY')}; load average "
             f"{' / '.join(map(str, doc['loadavg_start']))} (1/5/15 min) at the start, "
             f"{' / '.join(map(str, doc['loadavg_end']))} at the end. Seconds are medians over the repetitions "
             "after a warm-up; the `load` column is the 1-minute load average when the row started "
             "(above the core count means other processes competed for the CPU).",
             "",
             f"Scales: paper = {st['paper']['source']}; demo = {st['demo']['source']}.",
             f"Peak memory: {doc['peak_memory_note']} Shown as peak (added by the measurement).",
             "CPU-s: process CPU seconds summed over threads; images per CPU-second is the throughput of one "
             "unshared core, which a busy machine disturbs less than wall time.", ""]

    if res.get("zo_step"):
        lines += ["### ZO synthesis step", "",
                  "One generator step: G(z), augment, (q + 1) API queries per image, zero-order estimate, "
                  "surrogate backward, Adam.", ""]
        lines += _rows(res["zo_step"], ["scale", "size", "images x q / numsplit", "s / step", "API images/s",
                                        "API images / CPU-s", "API forward share", "peak mem", "reps", "load"],
                       lambda c: [_scale(c), f"{c['image_size']}x{c['image_size']}",
                                  f"{c['batch']} x {c['settings']['q']} / {c['settings']['numsplit']}",
                                  _s(c["seconds"]), f"{c['images_per_s']:,.0f}",
                                  f"{c['images_per_cpu_s']:,.0f}" if c.get("images_per_cpu_s") else "-",
                                  f"{c['api_forward_share']:.0%}", _mem(c), c["reps"], _load(c)])
        o = doc.get("reference", {}).get("zo_step_original", ORIGINAL_ZO_STEP)
        paper32 = next((c for c in res["zo_step"] if c["scale"] == "paper" and c["image_size"] == 32
                        and "seconds" in c), None)
        ref = (f"Reference ({o['source']}): {o['seconds_per_step'][0]}-{o['seconds_per_step'][1]} s per step, "
               f"{o['images_per_s'][0]:,}-{o['images_per_s'][1]:,} API images/s, "
               f"{o['api_forward_share'][0]:.0%}-{o['api_forward_share'][1]:.0%} in the API forward, "
               f"peak memory {o['peak_mem_gb']} GB ({o['peak_mem_gb_numsplit_1']} GB with numsplit 1).")
        if paper32:
            lo, hi = (paper32["images_per_s"] / o["images_per_s"][1], paper32["images_per_s"] / o["images_per_s"][0])
            ref += f" The paper/32x32 row is {lo:.1f}-{hi:.1f}x its throughput."
        lines += ["", ref, ""]

    if res.get("kd_task"):
        lines += ["### Bi-level KD task (one API visit)", "",
                  "Recover the support set, adapt the meta model (KL, second order), recover the query set "
                  "with the boundary term, outer KL, backward, Adam. Each recovery runs only the `steps run` "
                  "generator steps; **the visit column extrapolates** the measured per-step recovery time to "
                  "`generate_iterations` steps (plus the measured adaptation and backward).", ""]
        lines += _rows(res["kd_task"], ["scale", "size", "images sup+qry x q", "steps run", "measured s",
                                        "support s/step", "query s/step", "adapt+outer fwd s", "backward s",
                                        "visit s (extrapolated)", "queries / visit", "peak mem", "load"],
                       lambda c: [_scale(c), f"{c['image_size']}x{c['image_size']}",
                                  f"{c['settings']['way_pretrain'] * c['settings']['num_sup_kd']}+"
                                  f"{c['settings']['way_pretrain'] * c['settings']['num_qur_kd']} x {c['settings']['q']}",
                                  c["generator_steps_run"], _s(c["seconds"]), _s(c["support_s_per_step"]),
                                  _s(c["query_s_per_step"]), _s(c["adapt_outer_forward_s"]), _s(c["backward_s"]),
                                  f"**{_s(c['visit_seconds_extrapolated'])}** ({c['generate_iterations']} steps)"
                                  if c["extrapolated"] else _s(c["seconds"]),
                                  f"{c['queries_per_visit']:,}", _mem(c), _load(c)])
        lines += [""]

    if res.get("replay_batch"):
        lines += ["### Replay meta-batch", "",
                  "episode_batch tasks from the memory (synthetic images), inner steps with cross-entropy, "
                  "backward of each task's outer loss, one Adam step.", ""]
        lines += _rows(res["replay_batch"], ["scale", "size", "task", "s / meta-batch", "tasks/s", "order",
                                             "peak mem", "reps", "load"],
                       lambda c: [_scale(c), f"{c['image_size']}x{c['image_size']}",
                                  f"{c['settings']['episode_batch']} x {c['settings']['way_train']}-way "
                                  f"{c['shot']}-shot {c['settings']['num_qur_train']} queries, "
                                  f"{c['settings']['inner_update_num']} steps",
                                  _s(c["seconds"]), c["tasks_per_s"], "second" if c["second_order"] else "first",
                                  _mem(c), c["reps"], _load(c)])
        lines += [""]

    if res.get("eval_task"):
        lines += ["### Evaluation task", "",
                  "Adapt on the support set without a graph, then the query accuracy.", ""]
        lines += _rows(res["eval_task"], ["scale", "size", "task", "s / task", "tasks/s", "600 tasks s",
                                          "peak mem", "reps", "load"],
                       lambda c: [_scale(c), f"{c['image_size']}x{c['image_size']}",
                                  f"{c['settings']['way_test']}-way {c['shot']}-shot "
                                  f"{c['settings']['num_qur_test']} queries, {c['settings']['test_inner_update_num']} steps",
                                  _s(c["seconds"]), c["tasks_per_s"], _s(c["seconds_600_tasks"]),
                                  _mem(c), c["reps"], _load(c)])
        lines += [""]
    return "\n".join(lines)
