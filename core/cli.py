"""How entry points end: a project error becomes one line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable

from .errors import BidfError, Interrupted


def run(main: Callable, *args, **kwargs):
    """Call main(*args, **kwargs); print a BidfError as `error: <message>` and exit 2
    (130 after Ctrl-C), without a traceback. Anything else is a bug and keeps its traceback."""
    try:
        return main(*args, **kwargs)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(130)
    except BidfError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
