"""The one configuration: presets, precedence, generated parsers and docs; errors a program can catch;
checkpoints loaded as data only."""
from __future__ import annotations

import os
import pickle
import subprocess

import pytest
import torch

from conftest import REPO, run_cli
from core import config
from core.errors import BidfError, CheckpointError, DataError, FlagError

# The flags of the original implementation's scriptskd/ss.sh, sh.sh and mh.sh (Egg-Hu/BiDf-MKD),
# written out here by hand so that a preset that drifts from them fails.
ORIGINAL_SS = dict(
    dataset="cifar100", way_train=5, num_sup_train=1, num_qur_train=15, way_test=5, num_sup_test=1,
    num_qur_test=15, backbone="conv4", episode_train=240000, episode_test=600, inner_update_num=5,
    test_inner_update_num=10, start_id=1, inner_lr=0.01, outer_lr=0.001, episode_batch=4, val_interval=2000,
    save_interval=2000, num_sup_kd=30, num_qur_kd=30, inner_update_num_kd=10, adv=1.0, advstartit=4000,
    way_pretrain=5, pre_backbone="conv4", generate_interval=200, generate_iterations=200, Glr=0.001, ZO=True,
    mu=0.005, q=100, numsplit=5)
ORIGINAL = {"paper_ss": ORIGINAL_SS,
            "paper_sh": {**ORIGINAL_SS, "pre_backbone": "mix"},
            "paper_mh": {**ORIGINAL_SS, "dataset": "mix", "pre_backbone": "mix"}}


@pytest.mark.parametrize("preset", sorted(ORIGINAL))
def test_paper_presets_are_the_original_scripts(preset):
    from main import parse_args
    cfg = parse_args(["--preset", preset])
    assert {k: getattr(cfg, k) for k in ORIGINAL[preset]} == ORIGINAL[preset]
    # everything the scripts do not set keeps the original's argparse default
    others = {k for k in config.FIELDS if k not in ORIGINAL[preset] and k != "multigpu"}
    assert {k: getattr(cfg, k) for k in others} == {k: getattr(config.DEFAULTS, k) for k in others}


def test_explicit_flags_override_the_preset_wherever_they_stand():
    from main import parse_args
    cfg = parse_args(["--num_sup_train", "5", "--preset", "paper_ss", "--no-ZO", "--num_sup_test", "5"])
    assert (cfg.num_sup_train, cfg.num_sup_test, cfg.ZO, cfg.q) == (5, 5, False, 100)
    assert parse_args([]).num_sup_train == config.DEFAULTS.num_sup_train      # no preset: the defaults


def test_preset_help_shows_the_preset_values():
    proc = run_cli(["main.py", "--preset", "paper_ss", "--help"], env_extra={"COLUMNS": "200"})
    line = next(li for li in proc.stdout.splitlines() if li.strip().startswith("--advstartit"))
    assert "(default: 4000)" in line


def test_scenario_script_passes_extra_flags_through(tmp_path):
    """bash scriptskd/ss.sh --num_sup_train 5 ... is the preset plus those flags (checked with --help)."""
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run(["bash", "scriptskd/ss.sh", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300).stdout
    assert "(default: 4000)" in next(li for li in out.splitlines() if li.strip().startswith("--advstartit"))


def test_bad_preset_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("num_sup_trian = 5\n")
    with pytest.raises(FlagError, match="num_sup_trian"):
        config.parse(["--preset", str(bad)])
    with pytest.raises(FlagError, match="paper_ss"):
        config.parse(["--preset", "nope"])


def test_settings_objects_take_config_names_and_defaults():
    from methods.kd import KDSettings
    from synthesis.recover import ZOConfig
    cfg = config.Config(q=7, numsplit=3, inner_update_num_kd=2, approx=True)
    zo = config.settings(ZOConfig, cfg)
    kd = config.settings(KDSettings, cfg, zo=zo)
    assert (zo.q, zo.mu, zo.numsplit) == (7, config.DEFAULTS.mu, 3)
    assert (kd.inner_update_num_kd, kd.approx, kd.zo) == (2, True, zo)
    assert ZOConfig().q == config.DEFAULTS.q and KDSettings().num_sup_kd == config.DEFAULTS.num_sup_kd


def test_options_doc_matches_the_parsers():
    """docs/options.md is generated from the parsers (python -m core.options > docs/options.md)."""
    from core.options import markdown
    with open(os.path.join(REPO, "docs", "options.md")) as f:
        assert f.read() == markdown(), "docs/options.md is stale: run `python -m core.options > docs/options.md`"
    help_text = run_cli(["main.py", "--help"], env_extra={"COLUMNS": "200"}).stdout
    flags = {w.rstrip(",") for line in help_text.splitlines() if line.strip().startswith("--")
             for w in line.split("  ")[1].split() if w.startswith("--")}
    assert len(flags) > 50 and not [f for f in flags if f"`{f}`" not in markdown() and f != "--help"]


# ------------------------------------------------------------------ errors and checkpoints


def test_library_errors_are_ordinary_exceptions(tmp_path):
    from dataset import get_spec, load_split
    try:
        load_split(str(tmp_path / "nothing"), get_spec("cifar100"), "meta_train")
    except Exception as e:      # noqa: BLE001 - what a notebook or a sweep script would write
        caught = e
    assert isinstance(caught, DataError) and isinstance(caught, BidfError)
    assert "write_cifar100_filelist.py" in str(caught) and "\n" not in str(caught)
    assert not isinstance(caught, SystemExit)


class _Payload:
    """Unpickling this runs `open(path, 'w')`: what a hostile checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_evaluate_refuses_a_checkpoint_that_would_run_code(tmp_path, demo_root):
    marker = tmp_path / "pwned"
    ck = tmp_path / "best.pth"
    with open(ck, "wb") as f:
        pickle.dump({"model": _Payload(str(marker))}, f)
    proc = run_cli(["main.py", "--dataset", "demo", "--data_root", demo_root, "--evaluate", str(ck),
                    "--episode_test", "2", "--out_dir", str(tmp_path / "eval")], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and str(ck) in lines[0], proc.stderr
    assert not marker.exists()


def test_load_checkpoint_reads_plain_data_only(tmp_path):
    from core.io import load_checkpoint
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(2), "state": {"task": 3, "best": (1.0, 2.0)}}, good)
    assert load_checkpoint(str(good))["state"]["task"] == 3
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_recipes_sit_under_presets_and_explicit_flags():
    from main import parse_args
    assert parse_args([]).init == "original"                                    # faithful by default
    improved = parse_args(["--recipe", "improved"])
    assert {k: getattr(improved, k) for k in config.RECIPES["improved"]} == config.RECIPES["improved"]
    assert parse_args(["--recipe", "improved", "--init", "original"]).init == "original"   # flags win
    assert parse_args(["--preset", "demo", "--recipe", "improved"]).dataset == "demo"
    with pytest.raises(FlagError, match="--recipe"):
        parse_args(["--recipe", "best"])


def test_deterministic_flag_turns_on_deterministic_kernels_in_every_entry_point():
    # in a child process: the setting is process-wide
    code = ("import os, sys, torch\n"
            "from core.device import pick_device\n"
            "import main, pretrain, synthesis.__main__ as synth\n"
            "cfgs = [main.parse_args(['--deterministic']), pretrain.parse_args(['--deterministic']),\n"
            "        synth.parse_args(['--deterministic'])[0], main.parse_args([])]\n"
            "print([c.deterministic for c in cfgs])\n"
            "assert not torch.are_deterministic_algorithms_enabled()\n"
            "pick_device(0, deterministic=cfgs[0].deterministic)\n"
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),\n"
            "      os.environ['CUBLAS_WORKSPACE_CONFIG'])\n")
    proc = run_cli(["-c", code], env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.stdout.split("\n")[:2] == ["[True, True, True, False]", "True True :4096:8"]
    assert "deterministic" in config.RUNTIME_KEYS          # a resume may switch it: same results, other bits
