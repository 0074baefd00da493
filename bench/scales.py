"""The two scales the benchmarks run at: the presets `paper_ss` (the paper's API-SS settings) and
`demo` (the embedded demo), read through main.py's own parser, so a changed preset or default
changes the bench too.
"""
from __future__ import annotations

from core.config import FIELDS

# The flag groups of core/config.py each measurement reads its settings from: two scales whose settings
# agree on them give the same measurement (measured once, reported for both).
GROUPS = {
    "zo_step": ("bi-level meta knowledge distillation", "API pool and data recovery", "zero-order optimisation"),
    "kd_task": ("tasks (memory replay and evaluation)", "bi-level meta knowledge distillation",
                "API pool and data recovery", "zero-order optimisation"),
    "replay_batch": ("tasks (memory replay and evaluation)",),
    "eval_task": ("tasks (memory replay and evaluation)",),
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
    return {k: getattr(cfg, k) for k, f in FIELDS.items() if f.metadata["group"] in GROUPS[measurement]}
