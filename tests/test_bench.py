"""bench/ as a user runs it (commands only: tests import no benchmark): the cost projection, the executor
it projects, the GPU check's commands, one zero-order step of each API forward."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, run_cli

TINY = ["--preset", "demo", "--generate_iterations", "2", "--q", "2", "--num_sup_kd", "2", "--num_qur_kd", "2",
        "--episode_test", "10"]


def test_estimate_projects_the_run_with_the_executor_its_flags_ask_for(tmp_path):
    """One projection: JSON last, every stage, the visit bounds of the demo, and the replay and evaluation
    stages priced with the executor --task_exec names (vmapped chunks of 3 here), not one task at a time."""
    out = str(tmp_path / "estimate.json")
    proc = run_cli(["-m", "bench", "--estimate", "--quick", "--out", out, "--", *TINY, "--task_exec", "vmap:3"])
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"wall_hours", "peak_mem_gb", "disk_gb", "api_visits"} <= set(last) and last["wall_hours"] > 0
    assert set(last["hours_by_stage"]) == {"API visits", "replay", "evaluation", "checkpoints"}
    assert "measured" in proc.stdout and "extrapolated" in proc.stdout
    doc = json.load(open(out))
    assert doc["api_visits"] == 20                                      # bound: 100 meta-batches, one visit per 5
    assert doc["assumptions"]["alternatives"]["demo"]["api_visits"] == 9      # the rate the demo showed
    stages = {s["stage"]: s for s in doc["stages"]}
    replay, ev = doc["measured"]["replay_batch"], doc["measured"]["eval_task"]
    assert doc["measured"]["executor"] == "vmap:3"
    assert stages["replay"]["each_s"] == pytest.approx(replay["other"]["seconds"] / 4)
    assert stages["evaluation"]["each_s"] == pytest.approx(ev["others"]["vmap:3"]["seconds_per_task"])
    assert "executor vmap:3" in stages["replay"]["basis"] and "executor vmap:3" in stages["evaluation"]["basis"]


def test_a_budget_caps_the_projected_visits(tmp_path):
    out = str(tmp_path / "estimate.json")
    run_cli(["-m", "bench", "--estimate", "--quick", "--visits", "7", "--out", out, "--", *TINY,
             "--query_budget", "300", "--task_exec", "sequential"])
    doc = json.load(open(out))
    # a visit: 5 classes x (2 + 2) images x (2 steps x (q 2 + 1) + 1) = 140 queries, so 300 cover 2 of the 7
    assert doc["api_visits"] == 2 and "query_budget" in doc["assumptions"]["api_visits"]
    assert doc["measured"]["executor"] == "sequential"


def test_gpu_check_dry_run_lists_and_parses_its_commands(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path / "gpu"))
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    steps = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("[gpu_check] ") and ">" in line]
    assert steps == ["[gpu_check] tests", "[gpu_check] bench", "[gpu_check] visit", "[gpu_check] estimate",
                     "[gpu_check] estimate_seq"]
    assert "BIDF_TEST_DEVICE=cuda bash tests/run.sh" in proc.stdout and "--kd_steps 200" in proc.stdout
    assert not os.path.exists(tmp_path / "gpu")             # a dry run writes nothing


@pytest.mark.parametrize("api", [[], ["--plain_api"]])
def test_zo_step_queries_q_plus_one_images_per_image_with_either_forward(api):
    proc = run_cli(["bench/zo_step.py", "--steps", "1", "--warmup", "0", "--q", "4", "--numsplit", "2",
                    "--per_class", "2", *api])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["images_per_step"] == 5 * 2 * (4 + 1) and out["images_per_s"] > 0
    assert out["api"] == ("plain" if api else "fast") and out["lanes"] == (1 if api else 2)
