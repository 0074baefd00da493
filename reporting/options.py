"""docs/options.md, generated from the entry points' parsers:  python -m reporting.options > docs/options.md"""
from __future__ import annotations


def markdown() -> str:
    import main
    import pretrain
    from synthesis import __main__ as synthesis_cli

    from core.config import make_parser, options_markdown
    parts = ["# Options", "",
             "Generated from the flag parsers (`python -m reporting.options > docs/options.md`); a test keeps it in "
             "step with `--help`. Every setting, its default and its help text live in `core/config.py`; a "
             "preset (`--preset NAME`, the files in `config/`) changes the defaults, and explicit flags win.", ""]
    for spec in (main.PARSER, pretrain.PARSER, synthesis_cli.PARSER):
        parts.append(options_markdown(make_parser(**spec), spec["prog"]))
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
