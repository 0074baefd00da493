"""docs/options.md, generated from the entry points' flag parsers (the help text lives in core/config.py).

    python -m experiments.options > docs/options.md
    python -m experiments.options --check        exit 1 when docs/options.md differs from the parsers
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def flags_markdown(parser: argparse.ArgumentParser, title: str) -> str:
    """The flags of a parser as markdown tables, one per group (docs/options.md is made of these)."""
    out = [f"## {title}", ""]
    for g in parser._action_groups:       # noqa: SLF001 - argparse offers no public walk of groups
        acts = [a for a in g._group_actions if a.option_strings and a.dest != "help"  # noqa: SLF001
                and a.help != argparse.SUPPRESS]
        if not acts:
            continue
        out += [f"### {g.title}", "", "| flag | help |", "|---|---|"]
        for a in acts:
            flags = ", ".join(f"`{s}`" for s in a.option_strings)
            out.append(f"| {flags} | {(a.help or '').replace('|', '&#124;')} |")
        out.append("")
    return "\n".join(out)


def markdown() -> str:
    import main
    import pretrain
    from core.config import make_parser
    from synthesis import __main__ as synthesis_cli
    parts = ["# Options", "",
             "Generated from the flag parsers (`python -m experiments.options > docs/options.md`); a test keeps it "
             "in step with `--help`. Every setting, its default and its help text live in `core/config.py`; a "
             "preset (`--preset NAME`, the files in `config/`) changes the defaults, and explicit flags win.", ""]
    for spec in (main.PARSER, pretrain.PARSER, synthesis_cli.PARSER):
        parts.append(flags_markdown(make_parser(**spec), spec["prog"]))
    return "\n".join(parts)


if __name__ == "__main__":
    doc = markdown()
    if sys.argv[1:] == ["--check"]:
        with open(os.path.join(ROOT, "docs", "options.md")) as f:
            stale = f.read() != doc
        print("docs/options.md is stale: run `python -m experiments.options > docs/options.md`" if stale
              else "docs/options.md matches the parsers")
        sys.exit(1 if stale else 0)
    print(doc, end="")
