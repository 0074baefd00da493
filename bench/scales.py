"""The two scales the benchmarks run at, read from the scripts that define them.

paper: the flags `scriptskd/ss.sh` passes to main.py (API-SS, the paper's settings).
demo:  the flags of the first zero-order main.py command in `scriptskd/demo.sh`; while that script
       does not exist (or cannot be read), DEMO_FALLBACK on top of main.py's defaults.
Both go through main.py's own flag parser, so a default changed there changes the bench too.
"""
from __future__ import annotations

import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The small zero-order geometry the demo uses when scriptskd/demo.sh cannot tell.
DEMO_FALLBACK = ["--dataset", "demo", "--ZO", "--q", "20", "--numsplit", "1", "--num_sup_kd", "20",
                 "--num_qur_kd", "20", "--generate_iterations", "20"]

# The Config fields each measurement depends on (what makes two scales the same measurement).
FIELDS = {
    "zo_step": ("way_pretrain", "num_sup_kd", "num_qur_kd", "q", "mu", "numsplit"),
    "kd_task": ("way_pretrain", "way_train", "num_sup_kd", "num_qur_kd", "inner_update_num_kd", "inner_lr",
                "approx", "generate_iterations", "Glr", "q", "mu", "numsplit", "adv"),
    "replay_batch": ("way_train", "num_qur_train", "inner_update_num", "inner_lr", "approx", "episode_batch",
                     "outer_lr", "replay_augment"),
    "eval_task": ("way_test", "num_qur_test", "test_inner_update_num", "inner_lr"),
}


_DEFAULT = re.compile(r"^\s*(\w+)=\$\{(\w+):-([^}]*)\}", re.M)     # Q=${DEMO_Q:-20}
_PLAIN = re.compile(r"^\s*(\w+)=([^\s(${}]+)\s*(?:#.*)?$", re.M)     # Q=20
_ARRAY = re.compile(r"^\s*(\w+)=\((.*?)\)", re.M | re.S)            # COMMON=(--a 1 --b 2)


def _expand(text: str) -> str:
    """Substitute the script's simple variables ($X, ${X}, "${X[@]}") where the script defines them:
    X=${ENV:-default} (the environment's ENV wins, as in the shell), X=value, X=(words ...)."""
    values = {}
    for name, env, default in _DEFAULT.findall(text):
        values[name] = os.environ.get(env, default)
    for name, value in _PLAIN.findall(text):
        values.setdefault(name, value)
    for name, words in _ARRAY.findall(text):
        values[name] = " ".join(w for w in words.split() if not w.startswith("#"))
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        text = re.sub(r'"?\$\{%s\[@\]\}"?' % name, lambda _: value, text)
        text = re.sub(r"\$\{%s\}|\$%s\b" % (name, name), lambda _: value, text)
    return text


def main_py_flags(script: str) -> list[list[str]]:
    """The flag lists of every `python main.py ...` command in a shell script (continuation lines
    joined, comments dropped, the script's simple variables substituted; "$@" and flags whose value
    is still a shell expression left out)."""
    with open(script) as f:
        text = f.read().replace("\\\n", " ")
    text = _ARRAY.sub(lambda m: m.group(0).replace("\n", " "), text)
    text = _expand(text)
    commands = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        if "main.py" not in words:
            continue
        words = words[words.index("main.py") + 1:]
        for stop in ("&&", "||", ";", "|", ">", "2>&1"):
            if stop in words:
                words = words[:words.index(stop)]
        flags, i = [], 0
        while i < len(words):
            w = words[i]
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            pair = words[i:i + 2] if has_value else [w]
            if w.startswith("--") and not any("$" in p for p in pair):
                flags += pair
            i += len(pair)
        commands.append(flags)
    return commands


def _parse(flags: list[str]):
    from main import parse_args
    try:
        return parse_args(flags)
    except SystemExit:
        return None


def load_scales() -> dict:
    """{"paper": (Config, source, flags), "demo": (Config, source, flags)}: flags as given to main.py."""
    ss = os.path.join(ROOT, "scriptskd", "ss.sh")
    paper, paper_src, paper_flags = None, "scriptskd/ss.sh", []
    for flags in main_py_flags(ss) if os.path.exists(ss) else []:
        paper, paper_flags = _parse(flags), flags
        if paper is not None:
            break
    if paper is None:
        paper_flags = ["--ZO"]
        paper, paper_src = _parse(paper_flags), "main.py defaults + --ZO (scriptskd/ss.sh unreadable)"
    demo_sh = os.path.join(ROOT, "scriptskd", "demo.sh")
    demo, demo_flags, demo_src = None, DEMO_FALLBACK, "fallback " + " ".join(DEMO_FALLBACK) + " (scriptskd/demo.sh missing)"
    if os.path.exists(demo_sh):
        demo_src = "fallback " + " ".join(DEMO_FALLBACK) + " (no zero-order main.py command in scriptskd/demo.sh)"
        for flags in main_py_flags(demo_sh):
            c = _parse(flags)
            if c is not None and c.ZO and c.baseline == "none":
                demo, demo_flags, demo_src = c, flags, "scriptskd/demo.sh (its zero-order main.py command)"
                break
    if demo is None:
        demo = _parse(DEMO_FALLBACK)
    return {"demo": (demo, demo_src, demo_flags), "paper": (paper, paper_src, paper_flags)}


def settings_of(cfg, measurement: str) -> dict:
    return {k: getattr(cfg, k) for k in FIELDS[measurement]}
