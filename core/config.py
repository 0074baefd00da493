"""The run's configuration: every setting, its default and its help text live here and nowhere else.

    cfg = parse(argv)                          # main.py: defaults <- --preset <- explicit flags
    python main.py --preset paper_ss --num_sup_train 5

`Config` holds the original implementation's defaults (its mainKD.py argparse); the library reads
its settings from a Config. Each field's metadata says everything else about it: its flag group and
help, its bounds and choices (check_values), whether a resumed run may change it (runtime), and which
entry points besides main.py take it (entry): the flag parsers of main.py, pretrain.py and
`python -m synthesis` and every list of names derive from there. A preset is a small Python file in
config/ that assigns the fields that differ from the defaults (nanoGPT-style); a recipe is a preset in
config/recipes/ applied under it; explicit flags override both. The module imports nothing heavy.
"""
from __future__ import annotations

import argparse
import os
import runpy
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import FlagError

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")
RECIPE_DIR = os.path.join(PRESET_DIR, "recipes")
# Settings of earlier versions: ignored in the config.json of a run being resumed, refused as flags.
RETIRED = {"eval_chunk": "--task_exec vmap:N", "eval_lanes": "--task_exec lanes:N",
           "replay_lanes": "--task_exec lanes:N", "replay_vmap": "--task_exec vmap"}


def _opt(group: str):
    """A Config field of one flag group. Metadata: low (at least; an int setting is at least 1 unless its
    field says otherwise, None: any), above (more than), high (at most), choices (one of): checked by
    check_values; runtime=True: a --resume may change it (the results stay the same); entry: the other
    entry points that take it ("pretrain", "synthesis"); pool_file: an API file records it and a pool never
    mixes files that differ in it ({"before": what files written before the setting existed used})."""
    def make(default, help: str, **meta):
        return field(default=default, metadata={"help": help, "group": group, **meta})
    return make


_PRETRAIN_GROUP = "API pretraining (pretrain.py, main.py --pretrain)"
_basic, _task, _kd, _pool, _zo, _api = (_opt(g) for g in (
    "basic", "tasks (memory replay and evaluation)", "bi-level meta knowledge distillation",
    "API pool and data recovery", "zero-order optimisation", _PRETRAIN_GROUP))


P, S, PS = ("pretrain",), ("synthesis",), ("pretrain", "synthesis")    # the other entry points that take a flag


@dataclass
class Config:
    # basic
    multigpu: str = _basic("0", "visible CUDA devices (CUDA_VISIBLE_DEVICES; kept from the environment if unset)",
                           runtime=True)
    gpu: int = _basic(0, "CUDA device among the visible ones (the CPU when there is none; under torchrun each "
                         "process uses its local rank)", low=0, runtime=True, entry=PS)
    deterministic: bool = _basic(False, "deterministic GPU kernels only, so that a rerun or --resume gives the same "
                                        "bits (slower; the CPU's kernels already are)", runtime=True, entry=PS)
    dataset: str = _basic("cifar100", "cifar100 | miniimagenet | cub | demo; mix for API-MH", entry=PS)
    pretrained_path_prefix: str = _basic("./pretrained_blackbox", "root of the API pools", runtime=True, entry=PS)
    data_root: str = _basic("./DFL2Ldata", "root of the datasets", runtime=True, entry=P)
    out_dir: str | None = _basic(None, "run directory (default: runs/<name made of the key flags>)", runtime=True)
    seed: int = _basic(2022, "seed of the run: meta-model init, API draws, tasks", low=None, entry=S)
    eval_seed: int = _basic(0, "seed of the fixed evaluation tasks (the same for every run)", low=None)
    resume: bool = _basic(False, "continue the run in --out_dir from its last.pth", runtime=True)
    overwrite: bool = _basic(False, "delete the run in --out_dir and start over", runtime=True)
    baseline: str = _basic("none", "none | random_init (the untrained meta model) | maml_real (MAML on real images)",
                           choices=("none", "random_init", "maml_real"))
    evaluate: str | None = _basic(None, "only score this saved meta model (or 'random') on meta_test", metavar="CKPT",
                                  runtime=True)
    pretrain: bool = _basic(False, "pretrain the API pool these flags name (as pretrain.py does), then stop",
                            runtime=True)
    recipe: str = _basic("faithful", "faithful (the original's method) | improved (docs/differences.md): a preset "
                                     "of config/recipes/ applied under --preset", choices=("faithful", "improved"))
    task_exec: str = _basic("auto", "how a batch of tasks (a meta-batch's replay tasks, an evaluation) runs: "
                                    "sequential | lanes[:N] (N tasks at once in CPU threads) | vmap[:N] (chunks of N "
                                    "as one vmapped computation) | auto (vmap:16 on a GPU, lanes on a CPU with 2+ "
                                    "threads; accel/executors.py, bench/RESULTS.md)", runtime=True)
    # meta-training tasks (memory replay) and evaluation tasks
    way_train: int = _task(5, "classes per meta-training task", low=2)
    num_sup_train: int = _task(5, "support shots per class (training)")
    num_qur_train: int = _task(15, "query images per class (training)")
    way_test: int = _task(5, "classes per test task", low=2)
    num_sup_test: int = _task(5, "support shots per class (test)")
    num_qur_test: int = _task(15, "query images per class (test)")
    backbone: str = _task("conv4", "the meta model: conv4 | resnet10 | resnet18 | resnet34 | resnet50 | resnet101")
    init: str = _task("original", "meta-model (and API) init: original (its init_layer) | torch (PyTorch's)",
                      choices=("original", "torch"), entry=P, pool_file={"before": "torch"})
    episode_train: int = _task(240000, "meta-training tasks in total (API visits + replay tasks)")
    episode_test: int = _task(600, "evaluation tasks per split")
    start_id: int = _task(1, "id of the first task (tasks start_id..episode_train run)")
    inner_update_num: int = _task(5, "inner steps on replay tasks", low=0)
    test_inner_update_num: int = _task(10, "inner steps at test time", low=0)
    inner_lr: float = _task(0.01, "inner-loop SGD step", low=0)
    outer_lr: float = _task(0.001, "Adam step of the meta model", above=0)
    approx: bool = _task(False, "first-order MAML")
    episode_batch: int = _task(4, "tasks per meta-batch (one Adam step)")
    val_interval: int = _task(2000, "tasks between evaluations")
    save_interval: int = _task(2000, "tasks between checkpoints")
    # bi-level meta knowledge distillation
    num_sup_kd: int = _kd(30, "recovered support images per class")
    num_qur_kd: int = _kd(30, "recovered query images per class")
    inner_update_num_kd: int = _kd(10, "inner KD steps on the recovered support set", low=0)
    adv: float = _kd(1.0, "weight of the boundary term when the query set is recovered", low=0)
    boundary_student: str = _kd("clean", "boundary term's student: clean (once per step, as the original) | perturbed",
                                choices=("clean", "perturbed"))
    kd_augment: bool = _kd(True, "one crop/flip of each recovered set before KD (as the original)")
    kd_loss: str = _kd("original", "loss of the KD inner and outer loops: original (kl_div(softmax(student), "
                                   "softmax(API)), averaged over images and classes, as the original) | kl (a proper "
                                   "KL(API || student), averaged over images)", choices=("original", "kl"))
    advstartit: int = _kd(-1, "boundary query sets once this many meta-iterations have passed", low=None)
    # the API pool and data recovery
    way_pretrain: int = _pool(5, "classes per API", low=2, entry=PS)
    APInum: int = _pool(100, "APIs in the pool (per dataset and architecture)", entry=P)
    pre_backbone: str = _pool("conv4", "API architecture (a network name) for API-SS; mix for API-SH/MH", entry=PS)
    generate_interval: int = _pool(200, "meta-batches without a better training accuracy before the next API visit")
    generate_iterations: int = _pool(200, "generator steps per recovered set", entry=S)
    Glr: float = _pool(0.001, "Adam learning rate of the generator and its latent codes", above=0, entry=S)
    max_batch_per_class: int = _pool(20, "task memory: recovered batches kept per class")
    query_budget: int | None = _pool(None, "total API queries allowed (default: no limit)", entry=S)
    visit_threads: int = _pool(0, "CPU threads during an API visit's recovery and adaptation (0: the process's "
                                  "torch threads); other work keeps the process's", low=0, runtime=True)
    meta_generator: bool = _pool(False, "start each recovery from a meta-generator learnt across API visits (Reptile), "
                                        "not a fresh generator (off: the original; docs/queries.md)")
    meta_generator_steps: int = _pool(4, "with --meta_generator: zero-order generator steps per recovered set "
                                         "(instead of --generate_iterations)")
    meta_generator_lr: float = _pool(1.0, "with --meta_generator: Reptile step size ε, φ <- φ + ε(φ' - φ), "
                                          "in (0, 1]", above=0, high=1)
    recovery: str = _pool("invert", "how a visit recovers its sets: invert (a generator trained on zero-order "
                                    "gradient estimates, as the original) | screen (the candidates of a procedural "
                                    "image prior the API rates highest, one query each; docs/differences.md B22)",
                          choices=("invert", "screen"), entry=S)
    screen_candidates: int = _pool(0, "with --recovery screen: candidates queried per recovered image (0: as many "
                                      "as an inversion spends, (q + 1) x generate_iterations)", low=0, entry=S)
    screen_prior: str = _pool("leaves", "with --recovery screen: the candidates' prior: leaves (flat-coloured dead "
                                        "leaves) | textured (leaves of stripes and checkerboards, with pixel noise; "
                                        "docs/differences.md B24; inversion ignores it)",
                              choices=("leaves", "textured"), entry=S)
    screen_spread: int = _pool(1, "with --recovery screen: each class draws its images at random from its "
                                  "screen_spread x images best candidates (1: the best, as B22; B25)", low=1, entry=S)
    screen_memory: int = _pool(0, "with --recovery screen: the next-best candidates of each class, this many, also "
                                  "enter the task memory from the support set's screening (already answered: no "
                                  "query; 0: the sets alone, as an inversion visit)", low=0)
    prior_tv: float = _pool(0.0, "weight λ of a total-variation prior on the recovered images, added to the generator's "
                                 "objective (exact gradient, no query; 0: off, as the original; docs/differences.md B17)",
                            low=0, entry=S)
    prior_diversity: float = _pool(0.0, "weight λ of a diversity prior: the mean cosine similarity of a class's "
                                        "recovered images, added to the generator's objective (exact gradient, no "
                                        "query; 0: off, as the original; docs/differences.md B19)", low=0, entry=S)
    memory_labels: str = _pool("target", "labels of the recovered images in the task memory: target (the class "
                                         "each was recovered for, as the original) | api (the API's answer on it, "
                                         "already queried; docs/differences.md B20)", choices=("target", "api"))
    kd_replay: float = _pool(0.0, "KD replay: each replay task is, with this probability, a recorded API visit's "
                                  "bi-level KD task run again on the sets and API answers it queried (no query; 0: "
                                  "off, as the original; docs/differences.md B21)", low=0, high=1)
    kd_replay_keep: int = _pool(50, "with --kd_replay: the last recorded visits kept", low=1)
    replay_augment: bool = _pool(False, "random crop/flip of replayed images (off, as in the original)")
    replay_mix: float = _pool(0.0, "task interpolation: each replay task's images are mixed with a second memory "
                                   "task's, class by class, x = λ x1 + (1 - λ) x2, λ ~ Beta(α, α) per task (α; 0: "
                                   "off, as the original; docs/differences.md B18)", low=0)
    inversion_augment: str = _pool("batch", "inversion crop/flip: batch (one per step, as the original) | image",
                                   choices=("batch", "image"))
    keep_best: str = _pool("batch", "recovered images kept: batch (the whole batch of the step whose objective was "
                                    "lowest, as the original) | image (each image at its own best step)",
                           choices=("batch", "image"))
    api_output: str = _pool("logits", "what a black-box API answers: logits (as the original's; the cross-entropy and "
                                      "the boundary term's L1 are on them) | probs (class probabilities, as a service)",
                            choices=("logits", "probs"))
    memory_quantize: str = _pool("truncate", "the task memory's 8-bit pixels: truncate (as the original's PNG files) "
                                             "| round", choices=("truncate", "round"))
    api_trust: str = _pool("off", "judge each visited API before its recovered sets are used: off (every API trusted, "
                                  "as the original) | agree (its answers' sharpness and its agreement with other "
                                  "APIs and the memory; an untrusted API's visit is dropped and the API no longer "
                                  "drawn; docs/robustness.md)", choices=("off", "agree"))
    api_trust_judges: int = _pool(3, "with --api_trust agree: other APIs queried per class of the judged API")
    mh_generator: str = _pool("shared", "API-MH: one 84x84 generator for every visit, a 32x32 API seeing a random "
                                        "32x32 window of its images (as the original) | per_api (each API's size)",
                              choices=("shared", "per_api"))
    # zero-order optimisation
    ZO: bool = _zo(False, "black box: zero-order gradient estimates (--no-ZO: the white-box ablation)", entry=S)
    mu: float = _zo(0.005, "smoothing radius of the finite differences", above=0, entry=S)
    q: int = _zo(100, "random directions per image per generator step", entry=S)
    numsplit: int = _zo(5, "chunks the q perturbed copies are queried in (fewer: faster, more memory)", entry=S)
    zo_space: str = _zo("normalized", "perturb the normalized API input (as the original) | pixel ([0, 1] images)",
                        choices=("normalized", "pixel"))
    zo_estimator: str = _zo("forward", "zero-order estimate per image and step, either q + 1 queries (L(x) and q "
                                       "perturbed copies): forward ((L(x + mu u) - L(x)) / mu along q random "
                                       "directions, as the original) | central ((L(x + mu u) - L(x - mu u)) / (2 mu) "
                                       "along q/2 directions, antithetic pairs; q must be even)",
                            choices=("forward", "central"), entry=S)
    zo_resolution: int = _zo(0, "perturb at R x R per channel, upsampled to the image (R must divide its size): q "
                                "directions then span a C*R*R-dimensional space of block images instead of all "
                                "C*H*W pixels (0: full resolution, as the original; docs/queries.md)", low=0, entry=S)
    # API pretraining: every setting of this group shapes the pool, not a meta-training run (runtime there)
    api_seed: int = _api(0, "API i's classes and initial weights depend on (api_seed, i)", low=None)
    epochs: int | None = _api(None, "epochs per API (default: 60 cifar100/miniimagenet/demo, 100 cub)")
    batch_size: int = _api(128, "images per pretraining step", low=2)
    lr: float | None = _api(None, "pretraining learning rate (default 0.01: Adam for conv4, SGD for the resnets)")
    workers: int = _api(0, "threads decoding images", low=0)
    api_augment: bool = _api(False, "crop/flip while pretraining an API (the original uses plain images)",
                             pool_file={"before": True})
    api_patience: int = _api(60, "early stop: epochs without a better validation accuracy (the original's)",
                             pool_file={"before": None})
    tensorboard: bool = _api(True, "write TensorBoard curves of pretraining (<pool dir>/tensorboard/api_<i>)")

    def __post_init__(self):
        for name in _CHOICES:
            if getattr(self, name) not in FIELDS[name].metadata["choices"]:
                raise FlagError(f"{name} {getattr(self, name)!r} is unknown; choose one of "
                                f"{', '.join(FIELDS[name].metadata['choices'])}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def mh(self) -> bool:
        return self.dataset == "mix"


FIELDS = {f.name: f for f in fields(Config)}
_CHOICES = [k for k, f in FIELDS.items() if "choices" in f.metadata]
DEFAULTS = Config()
# Settings a --resume may change without changing the results (the pretraining group shapes the pool).
RUNTIME_KEYS = tuple(k for k, f in FIELDS.items() if f.metadata.get("runtime") or f.metadata["group"] == _PRETRAIN_GROUP)


def entry_settings(entry: str) -> tuple[str, ...]:
    """The settings an entry point other than main.py takes: "pretrain" (pretrain.py; the whole pretraining
    group too) or "synthesis" (python -m synthesis)."""
    return tuple(k for k, f in FIELDS.items() if entry in f.metadata.get("entry", ())
                 or (entry == "pretrain" and f.metadata["group"] == _PRETRAIN_GROUP))


PRETRAIN_SETTINGS = entry_settings("pretrain")
_TYPES = typing.get_type_hints(Config)


# ----------------------------------------------------------------------------- presets

def preset_names(folder: str = PRESET_DIR) -> list[str]:
    return sorted(os.path.splitext(n)[0] for n in os.listdir(folder)
                  if n.endswith(".py") and not n.startswith("_")) if os.path.isdir(folder) else []


def load_preset(name: str, folder: str = PRESET_DIR) -> dict:
    """The settings a preset assigns: <folder>/<name>.py (config/, or config/recipes/ for a recipe), or a
    path to any such .py file."""
    path = name if name.endswith(".py") else os.path.join(folder, f"{name}.py")
    if not os.path.isfile(path):
        flag = "--recipe" if folder == RECIPE_DIR else "--preset"
        raise FlagError(f"{flag} {name}: no such {flag[2:]}; choose one of {', '.join(preset_names(folder))}"
                        + (" or pass a path to a .py file of assignments" if flag == "--preset" else ""))
    ran = runpy.run_path(path)
    values = {k: v for k, v in ran.items() if not k.startswith("_")}
    if "_base" in ran:     # a preset may start from another one and change a few settings
        values = {**load_preset(ran["_base"]), **values}
    unknown = sorted(k for k in values if k not in FIELDS)
    if unknown:
        raise FlagError(f"preset {path} sets {', '.join(unknown)}, which no flag is called; fix the preset")
    return values


# ----------------------------------------------------------------------------- flag parsers

def _flag_type(name: str):
    t = _TYPES[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def add_arguments(parser: argparse.ArgumentParser, names=None, defaults: dict | None = None,
                  aliases: dict | None = None) -> None:
    """One --flag per Config field in `names` (all by default), grouped as in Config, with its help
    text and the default in force (`defaults` overrides Config's, e.g. a preset's values).
    Values not given on the command line are left out of the namespace (see `parse`)."""
    defaults = defaults or {}
    aliases = aliases or {}
    groups = {}
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        g = f.metadata["group"]
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        value, text = defaults.get(f.name, f.default), f.metadata["help"]
        if not (value is None and "default" in text):   # a None default is explained in the help text
            text += f" (default: {value})"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        typ = _flag_type(f.name)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ
            kw.setdefault("metavar", {int: "N", float: "X"}.get(typ, "STR"))
        groups[g].add_argument(f"--{f.name}", *aliases.get(f.name, ()), **kw)
    for old, new in RETIRED.items():
        parser.add_argument(f"--{old}", nargs="?", action=_Retired, new=new, help=argparse.SUPPRESS)


class _Retired(argparse.Action):
    """A flag of an earlier version: one line naming the flag that replaced it."""

    def __init__(self, *args, new: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        raise FlagError(f"{option_string} was replaced by {self.new} (docs/options.md); the executor runs a "
                        "meta-batch's replay tasks and the evaluations alike")


def build(values: dict) -> Config:
    return Config(**{**{k: v for k, v in asdict(DEFAULTS).items()}, **values})


def make_parser(*, prog: str | None = None, description: str = "", names=None, aliases=None, extra=None,
                defaults: dict | None = None) -> argparse.ArgumentParser:
    """The flag parser of an entry point: --preset, the `extra(parser)` arguments that are not
    settings, and one flag per Config field in `names` (all by default)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--preset", metavar="NAME", help=f"apply a preset first: {' | '.join(preset_names())} "
                   "(config/<NAME>.py) or a path to such a file; explicit flags override it")
    if extra is not None:
        extra(p)
    add_arguments(p, names, defaults, aliases)
    return p


def parse(argv=None, **spec) -> tuple[Config, argparse.Namespace]:
    """(Config, the namespace of the entry point's other arguments) from the command line;
    `spec` is make_parser's keywords. The namespace's `given` holds the settings given explicitly.

    Precedence: Config's defaults, then --recipe's values, then --preset's, then the flags given explicitly."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    preset = load_preset(known.preset) if known.preset else {}
    recipe = known.recipe or preset.get("recipe", DEFAULTS.recipe)
    if recipe not in FIELDS["recipe"].metadata["choices"]:
        raise FlagError(f"--recipe {recipe!r} is unknown; choose one of {', '.join(FIELDS['recipe'].metadata['choices'])}")
    names = spec.get("names")
    base = {k: v for k, v in {**load_preset(recipe, RECIPE_DIR), **preset, "recipe": recipe}.items()
            if names is None or k in names}
    ns = make_parser(**spec, defaults=base).parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if k in FIELDS}
    rest = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in FIELDS and k != "preset"})
    rest.given = set(given)
    return build({**base, **given}), rest


# ----------------------------------------------------------------------------- names, checks, costs

def run_name(cfg: Config) -> str:
    """runs/<name>: the flags that tell runs apart."""
    shots = f"{cfg.way_train}w{cfg.num_sup_train}s"
    if cfg.evaluate:
        src = "random" if cfg.evaluate == "random" else os.path.basename(os.path.dirname(os.path.abspath(cfg.evaluate)))
        return f"eval_{cfg.dataset}_{cfg.way_test}w{cfg.num_sup_test}s_{src}"
    if cfg.baseline != "none":
        return f"{cfg.baseline}_{cfg.dataset}_{cfg.backbone}_{shots}_seed{cfg.seed}"
    grad = f"ZO_q{cfg.q}_mu{cfg.mu}" if cfg.ZO else "whitebox"
    name = f"bidf_{cfg.dataset}_{cfg.pre_backbone}_{cfg.backbone}_{shots}_{grad}_api{cfg.APInum}"
    if cfg.approx:
        name += "_1order"
    return name + f"_seed{cfg.seed}"


def default_out_dir(cfg: Config) -> str:
    return cfg.out_dir or os.path.join("runs", run_name(cfg))


def config_diff(a: dict, b: dict) -> list[str]:
    """Settings (not runtime ones) whose values differ between two configs. A key that one side
    lacks (a run written before the setting existed) counts as its default."""
    keys = (set(a) | set(b)) - set(RUNTIME_KEYS) - set(RETIRED)
    default = lambda k: FIELDS[k].default if k in FIELDS and FIELDS[k].default is not MISSING else None  # noqa: E731
    return sorted(k for k in keys if a.get(k, default(k)) != b.get(k, default(k)))


def check_values(cfg: Config, names=None) -> None:
    """Each setting in `names` (all by default) against its field's low / above / choices."""
    for name in names or FIELDS:
        meta, v = FIELDS[name].metadata, getattr(cfg, name)
        if v is None:
            continue
        low = meta.get("low", 1 if _flag_type(name) is int else None)
        if low is not None and v < low:
            raise FlagError(f"--{name} must be at least {low}, got {v}")
        if "above" in meta and not v > meta["above"]:
            raise FlagError(f"--{name} must be more than {meta['above']}, got {v}")
        if "high" in meta and v > meta["high"]:
            raise FlagError(f"--{name} must be at most {meta['high']}, got {v}")
        if "choices" in meta and v not in meta["choices"]:
            raise FlagError(f"--{name} {v!r} is unknown; choose one of {', '.join(meta['choices'])}")
    if (names is None or "zo_estimator" in names) and cfg.zo_estimator == "central" and cfg.q % 2:
        raise FlagError(f"--zo_estimator central queries q/2 pairs (x + mu u, x - mu u): --q must be even, got {cfg.q}")


def visit_cost(cfg: Config) -> int:
    """API queries of one visit (upper bound): every synthesis step queries each image once,
    plus q perturbed copies with --ZO (screening: each recovered image's candidates once); then the API
    labels the kept images once."""
    if cfg.recovery == "screen":
        per_image = screen_candidates(cfg)
    else:
        per_image = recovery_steps(cfg) * ((cfg.q + 1) if cfg.ZO else 1)
    images = cfg.way_pretrain * (cfg.num_sup_kd + cfg.num_qur_kd)
    # --api_trust: each judge (at most judges per class) sees the support set, and the API as many images of
    # each judge's classes from the memory
    judging = 2 * cfg.way_pretrain ** 2 * cfg.api_trust_judges * cfg.num_sup_kd
    return images * (per_image + 1) + (judging if cfg.api_trust != "off" else 0)


def screen_candidates(cfg: Config) -> int:
    """Candidates screened per recovered image: --screen_candidates, or 0 for an inversion's queries."""
    return cfg.screen_candidates or (cfg.q + 1) * cfg.generate_iterations


def recovery_steps(cfg: Config) -> int:
    """Generator steps per recovered set: --meta_generator_steps with --meta_generator; none when screening."""
    if cfg.recovery == "screen":
        return 0
    return cfg.meta_generator_steps if cfg.meta_generator else cfg.generate_iterations
