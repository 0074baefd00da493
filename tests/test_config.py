"""core/config.py and the entry point's checks (methods/checks.py): presets and recipes (config/), precedence,
the settings derived from the fields' tags, retired flags, choice fields, generated parsers and
docs/options.md; library errors a program can catch."""
from __future__ import annotations

import os
import subprocess

import pytest

from conftest import REPO, run_cli
from core import config
from core.config import Config
from core.errors import BidfError, DataError, FlagError

pytestmark = pytest.mark.fast     # the fast tier, but for the tests marked slow

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


# ------------------------------------------------------------------ presets, recipes, precedence

@pytest.mark.parametrize("preset", sorted(ORIGINAL))
def test_paper_presets_are_the_original_scripts(preset):
    from main import parse_args
    cfg = parse_args(["--preset", preset])
    assert {k: getattr(cfg, k) for k in ORIGINAL[preset]} == ORIGINAL[preset]
    # everything the scripts do not set keeps the original's argparse default
    others = {k for k in config.FIELDS if k not in ORIGINAL[preset] and k != "multigpu"}
    assert {k: getattr(cfg, k) for k in others} == {k: getattr(config.DEFAULTS, k) for k in others}


def test_every_preset_file_loads_and_names_known_settings():
    names = config.preset_names()
    assert {"demo", "paper_ss", "paper_sh", "paper_mh"} <= set(names)
    for name in names:
        values = config.load_preset(name)
        assert values and set(values) <= set(config.FIELDS), name
    assert config.load_preset("paper_mh")["advstartit"] == 4000          # _base: paper_ss, then its own values
    assert config.preset_names(config.RECIPE_DIR) == ["faithful", "improved"]


def test_explicit_flags_override_the_preset_wherever_they_stand():
    from main import parse_args
    cfg = parse_args(["--num_sup_train", "5", "--preset", "paper_ss", "--no-ZO", "--num_sup_test", "5"])
    assert (cfg.num_sup_train, cfg.num_sup_test, cfg.ZO, cfg.q) == (5, 5, False, 100)
    assert parse_args([]).num_sup_train == config.DEFAULTS.num_sup_train      # no preset: the defaults


def test_recipes_are_presets_under_presets_and_explicit_flags(tmp_path):
    from main import parse_args
    assert config.load_preset("faithful", config.RECIPE_DIR) == {}            # the defaults as they are
    improved = config.load_preset("improved", config.RECIPE_DIR)
    assert improved == {"init": "torch", "keep_best": "image", "api_output": "probs", "recovery": "screen",
                        "screen_candidates": 210, "screen_prior": "textured"}
    assert parse_args([]).init == "original" and parse_args([]).recipe == "faithful"
    cfg = parse_args(["--recipe", "improved"])
    assert {k: getattr(cfg, k) for k in improved} == improved and cfg.recipe == "improved"
    assert parse_args(["--recipe", "improved", "--init", "original"]).init == "original"   # flags win
    both = parse_args(["--preset", "demo", "--recipe", "improved"])
    assert (both.dataset, both.init) == ("demo", "torch")
    # a preset may name its recipe; the preset's own values sit above the recipe's
    (tmp_path / "mine.py").write_text('recipe = "improved"\nq = 7\n')
    (tmp_path / "pinned.py").write_text('recipe = "improved"\ninit = "original"\n')
    mine = parse_args(["--preset", str(tmp_path / "mine.py")])
    assert (mine.recipe, mine.init, mine.q) == ("improved", "torch", 7)
    assert parse_args(["--preset", str(tmp_path / "pinned.py")]).init == "original"
    with pytest.raises(FlagError, match="--recipe"):
        parse_args(["--recipe", "best"])
    with pytest.raises(FlagError, match="--recipe best: no such recipe"):
        config.load_preset("best", config.RECIPE_DIR)


def test_bad_preset_is_one_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("num_sup_trian = 5\n")
    with pytest.raises(FlagError, match="num_sup_trian") as e:
        config.parse(["--preset", str(bad)])
    assert "\n" not in str(e.value)
    with pytest.raises(FlagError, match="paper_ss"):
        config.parse(["--preset", "nope"])


def test_preset_help_shows_the_preset_values(capsys, monkeypatch):
    from main import parse_args
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        parse_args(["--preset", "paper_ss", "--help"])
    assert e.value.code == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if li.strip().startswith("--advstartit"))
    assert "(default: 4000)" in line


@pytest.mark.slow
def test_scenario_script_passes_extra_flags_through():
    """bash scriptskd/ss.sh --num_sup_train 5 ... is the preset plus those flags (checked with --help)."""
    env = dict(os.environ, COLUMNS="200")
    out = subprocess.run(["bash", "scriptskd/ss.sh", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300).stdout
    assert "(default: 4000)" in next(li for li in out.splitlines() if li.strip().startswith("--advstartit"))


# ------------------------------------------------------------------ settings derived from the fields' tags

def test_settings_lists_derive_from_the_field_tags():
    tagged = {k for k, f in config.FIELDS.items() if f.metadata.get("runtime")}
    pretrain_group = {k for k, f in config.FIELDS.items() if f.metadata["group"] == config._PRETRAIN_GROUP}
    assert set(config.RUNTIME_KEYS) == tagged | pretrain_group
    assert {"deterministic", "task_exec", "resume", "overwrite", "out_dir", "visit_threads", "epochs",
            "evaluate"} <= set(config.RUNTIME_KEYS)
    assert not {"q", "seed", "inner_lr", "ZO", "episode_train", "init"} & set(config.RUNTIME_KEYS)
    synthesis = set(config.entry_settings("synthesis"))
    assert {"ZO", "q", "mu", "numsplit", "Glr", "generate_iterations", "seed", "query_budget", "dataset",
            "pre_backbone", "way_pretrain", "gpu", "deterministic", "pretrained_path_prefix"} <= synthesis
    assert not {"inner_lr", "episode_train", "data_root", "api_seed"} & synthesis
    pretrain = set(config.PRETRAIN_SETTINGS)
    assert pretrain_group | {"dataset", "pre_backbone", "way_pretrain", "APInum", "init", "data_root",
                             "pretrained_path_prefix", "gpu", "deterministic"} <= pretrain
    assert not {"q", "ZO", "inner_lr", "seed"} & pretrain       # pretrain.py's --seed is an alias of api_seed


def test_entry_point_parsers_take_exactly_their_settings():
    import pretrain
    from synthesis import __main__ as synthesis_cli

    def settings(parser_spec):
        p = config.make_parser(**parser_spec)
        return {a.dest for a in p._actions if a.dest in config.FIELDS and a.help != "==SUPPRESS=="}
    assert settings(synthesis_cli.PARSER) == set(config.entry_settings("synthesis"))
    assert settings(pretrain.PARSER) == set(config.PRETRAIN_SETTINGS)
    cfg, rest = synthesis_cli.parse_args(["--q", "7", "--budget", "50", "--api", "2"])
    assert (cfg.q, cfg.query_budget, rest.api) == (7, 50, 2)
    assert pretrain.parse_args(["--seed", "3", "--no_tensorboard"]).api_seed == 3
    with pytest.raises(SystemExit):                                     # not a pretraining setting
        pretrain.parse_args(["--inner_lr", "0.1"])


def test_config_diff_ignores_runtime_and_retired_settings_and_reads_missing_ones_as_defaults():
    a = Config().to_dict()
    b = Config(task_exec="sequential", visit_threads=2, epochs=3, q=7).to_dict()
    assert config.config_diff(a, b) == ["q"]
    old = {k: v for k, v in a.items() if k != "meta_generator"}        # a run from before the setting existed
    old["eval_lanes"] = 2                                               # and with a retired one
    assert config.config_diff(old, a) == []
    assert config.config_diff(old, Config(meta_generator=True).to_dict()) == ["meta_generator"]


def test_run_names_tell_runs_apart():
    names = {config.run_name(Config(**kw)) for kw in (
        {}, {"ZO": True}, {"approx": True}, {"seed": 1}, {"baseline": "maml_real"}, {"baseline": "random_init"},
        {"evaluate": "random"}, {"num_sup_train": 1})}
    assert len(names) == 8
    assert config.default_out_dir(Config(out_dir="x/y")) == "x/y"
    assert config.default_out_dir(Config()).startswith("runs" + os.sep)


# ------------------------------------------------------------------ values: choices, bounds, retired flags

@pytest.mark.parametrize("name", ["baseline", "recipe", "init", "boundary_student", "inversion_augment", "zo_space"])
def test_config_refuses_an_unknown_choice_at_construction(name):
    with pytest.raises(FlagError, match=f"{name} 'nonsense' is unknown; choose one of") as e:
        Config(**{name: "nonsense"})
    for choice in config.FIELDS[name].metadata["choices"]:
        assert choice in str(e.value)
        Config(**{name: choice})


@pytest.mark.parametrize("kw, message", [
    ({"episode_batch": 0}, "--episode_batch must be at least 1"),
    ({"way_train": 1}, "--way_train must be at least 2"),
    ({"inner_update_num": -1}, "--inner_update_num must be at least 0"),
    ({"outer_lr": 0.0}, "--outer_lr must be more than 0"),
    ({"mu": -1.0}, "--mu must be more than 0"),
    ({"meta_generator_lr": 1.5}, "--meta_generator_lr must be at most 1"),
])
def test_check_values_names_the_flag_and_its_bound(kw, message):
    with pytest.raises(FlagError, match=message):
        config.check_values(Config(**kw))
    config.check_values(Config(seed=-5, advstartit=-1, inner_update_num=0))     # no bound / bound 0


@pytest.mark.parametrize("old", ["--eval_chunk 4", "--eval_lanes 2", "--replay_lanes 2", "--replay_vmap"])
def test_retired_flags_are_refused_with_one_line_naming_task_exec(old):
    from main import parse_args
    flag = old.split()[0]
    with pytest.raises(FlagError) as e:
        parse_args(["--dataset", "demo", *old.split()])
    msg = str(e.value)
    assert msg.startswith(f"{flag} was replaced by --task_exec") and "\n" not in msg
    assert config.RETIRED[flag[2:]] in msg


@pytest.mark.parametrize("spec", ["auto", "sequential", "lanes", "lanes:3", "vmap", "vmap:8"])
def test_task_exec_values_parse(spec):
    from main import parse_args
    from methods.checks import check
    check(parse_args(["--dataset", "demo", "--task_exec", spec]))


# ------------------------------------------------------------------ methods/checks.py: main.py's checks before any data

@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "--dataset 'imagenet' is unknown"),
    (["--backbone", "vgg"], "--backbone 'vgg' is unknown"),
    (["--pre_backbone", "vgg"], "--pre_backbone 'vgg' is unknown"),
    (["--dataset", "mix", "--pre_backbone", "conv4"], "--pre_backbone mix"),
    (["--task_exec", "lanes:x"], "task_exec 'lanes:x' is unknown"),
    (["--task_exec", "threads"], "task_exec 'threads' is unknown"),
    (["--task_exec", "vmap:0"], "N must be at least 1"),
    (["--task_exec", "sequential:2"], "task_exec 'sequential:2' is unknown"),
    (["--episode_train", "10", "--start_id", "11"], "--start_id 11 is past --episode_train 10"),
    (["--way_test", "6"], "--way_test 6 exceeds --way_train 5"),
    (["--way_pretrain", "6", "--way_test", "5"], "--way_pretrain 6 exceeds --way_train 5"),
    (["--evaluate", "/nonexistent/best.pth"], "no such checkpoint"),
    (["--resume", "--overwrite"], "contradict"),
    (["--way_train", "70", "--way_test", "5"], "--way_train 70 exceeds the 64 meta-train classes"),
    (["--num_sup_kd", "2", "--num_qur_kd", "3", "--max_batch_per_class", "4", "--num_sup_train", "1",
      "--num_qur_train", "40"], "memory replay needs 41 images per class"),
    (["--ZO", "--query_budget", "100"], "--query_budget 100 does not cover one API visit"),
])
def test_checks_name_the_flag_in_one_line(argv, message):
    from main import parse_args
    from methods.checks import check
    with pytest.raises(FlagError, match=message) as e:
        check(parse_args(["--dataset", "demo", *argv]))
    assert "\n" not in str(e.value)


def test_checks_skip_replay_rules_for_baselines_and_refuse_the_meta_generator_under_torchrun(monkeypatch):
    from main import parse_args
    from methods.checks import check
    check(parse_args(["--dataset", "demo", "--num_qur_train", "40", "--baseline", "maml_real"]))
    check(parse_args(["--dataset", "demo", "--meta_generator"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FlagError, match="--meta_generator .* without torchrun"):
        check(parse_args(["--dataset", "demo", "--meta_generator"]))


# ------------------------------------------------------------------ generated parsers and docs/options.md

def _help_flags(text: str) -> set[str]:
    return {w.rstrip(",") for line in text.splitlines() if line.strip().startswith("--")
            for w in line.split("  ")[1].split() if w.startswith("--")}


def test_options_doc_matches_the_parsers(monkeypatch):
    """docs/options.md is generated from the parsers (python -m experiments.options > docs/options.md)."""
    import main
    proc = run_cli(["-m", "experiments.options", "--check"], check=False)
    assert proc.returncode == 0, proc.stdout
    with open(os.path.join(REPO, "docs", "options.md")) as f:
        doc = f.read()
    monkeypatch.setenv("COLUMNS", "200")
    help_text = config.make_parser(**main.PARSER).format_help()
    flags = _help_flags(help_text)
    assert len(flags) > 50 and not [f for f in flags if f"`{f}`" not in doc and f != "--help"]
    for old in config.RETIRED:                  # retired flags are refused, not offered
        assert f"--{old}" not in help_text and f"`--{old}`" not in doc


# ------------------------------------------------------------------ errors


def test_library_errors_are_ordinary_exceptions(tmp_path):
    from dataset import get_spec, load_split
    try:
        load_split(str(tmp_path / "nothing"), get_spec("cifar100"), "meta_train")
    except Exception as e:      # noqa: BLE001 - what a notebook or a sweep script would write
        caught = e
    assert isinstance(caught, DataError) and isinstance(caught, BidfError)
    assert "write_cifar100_filelist.py" in str(caught) and "\n" not in str(caught)
    assert not isinstance(caught, SystemExit)
    with pytest.raises(BidfError):
        Config(baseline="nonsense")


@pytest.mark.slow
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
