"""The two scales the benchmarks run at: the presets `paper_ss` (the paper's API-SS settings) and
`demo` (the embedded demo), read through main.py's own parser, so a changed preset or default
changes the bench too.
"""
from __future__ import annotations

# The Config fields each measurement depends on (what makes two scales the same measurement).
FIELDS = {
    "zo_step": ("way_pretrain", "num_sup_kd", "num_qur_kd", "q", "mu", "numsplit"),
    "kd_task": ("way_pretrain", "way_train", "num_sup_kd", "num_qur_kd", "inner_update_num_kd", "inner_lr",
                "approx", "generate_iterations", "Glr", "q", "mu", "numsplit", "adv"),
    "replay_batch": ("way_train", "num_qur_train", "inner_update_num", "inner_lr", "approx", "episode_batch",
                     "outer_lr", "replay_augment"),
    "eval_task": ("way_test", "num_qur_test", "test_inner_update_num", "inner_lr"),
}
PRESETS = {"paper": "paper_ss", "demo": "demo"}


def load_scales() -> dict:
    """{"paper": (Config, source, flags), "demo": (Config, source, flags)}: flags as given to main.py."""
    from main import parse_args
    out = {}
    for scale, preset in PRESETS.items():
        flags = ["--preset", preset]
        out[scale] = (parse_args(flags), f"config/{preset}.py", flags)
    return out


def settings_of(cfg, measurement: str) -> dict:
    return {k: getattr(cfg, k) for k in FIELDS[measurement]}
