"""How entry points end: a project error becomes one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable

from .allocator import keep_freed_memory
from .errors import BidfError, Interrupted


def run(main: Callable, *args, **kwargs):
    """Call main(*args, **kwargs); print a BidfError as `error: <message>` and exit 2
    (130 after Ctrl-C), without a traceback. Anything else is a bug and keeps its traceback.
    glibc's malloc is set to reuse freed memory first (core/allocator.py)."""
    keep_freed_memory()
    try:
        return main(*args, **kwargs)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(130)
    except BidfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
