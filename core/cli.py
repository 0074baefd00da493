"""How entry points end: a project error becomes one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable

from .allocator import keep_freed_memory
from .errors import BidfError, Interrupted


def run(main: Callable, *args, **kwargs):
    """Call main(*args, **kwargs); print a BidfError as `error: <message>` and exit 2
    (130 after Ctrl-C or when another process of a torchrun launch ended), without a traceback.
    Anything else is a bug and keeps its traceback. glibc's malloc is set to reuse freed memory
    first (core/allocator.py).

    Under torchrun every process runs the same checks on the same flags and data, so rank 0 alone
    prints an error; a stopped run is reported by the first process that notices."""
    from .dist import Dist, first_to_report
    keep_freed_memory()
    procs = Dist.from_env()
    try:
        return main(*args, **kwargs)
    except Interrupted as e:
        if procs.world == 1 or first_to_report():
            print(str(e), file=sys.stderr)
        sys.exit(130)
    except BidfError as e:
        if procs.is_main:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
