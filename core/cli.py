"""How entry points start and end: the process settings for speed first (accel.process, before torch
loads), and a project error as one line on stderr with a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable

from .errors import BidfError, Interrupted


def run(main: Callable, *args, **kwargs):
    """Call main(*args, **kwargs); print a BidfError as `error: <message>` and exit 2
    (130 after Ctrl-C or when another process of a torchrun launch ended), without a traceback.
    Anything else is a bug and keeps its traceback.

    Under torchrun every process runs the same checks on the same flags and data, so rank 0 alone
    prints an error; a stopped run is reported by the first process that notices."""
    from accel.process import setup_process
    from .dist import Dist, first_to_report
    setup_process()
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
