"""The project's exceptions: library code raises them, entry points print them as one line.

Every message says what is wrong and what to do. The module imports nothing heavy, so
torch-free tools (the write_*_filelist.py scripts) can raise these too.
"""


class BidfError(Exception):
    """Base class: a problem the user can fix; str(e) is the one-line explanation."""


class FlagError(BidfError):
    """A command-line flag (or a combination of flags) that cannot work."""


class DataError(BidfError):
    """The user's dataset: missing folders or split files, unreadable images, too few classes."""


class PoolError(DataError):
    """The API pool: missing or foreign API files, an architecture that does not match."""


class CheckpointError(BidfError):
    """A checkpoint that cannot be read, or that holds something other than plain data."""


class RunDirError(BidfError):
    """A run directory that holds another run, a finished run, or an unfinished one."""


class QueryBudgetExceeded(BidfError):
    """The API query budget is spent."""


class Interrupted(BidfError):
    """The user pressed Ctrl-C; the message says which checkpoint is kept."""
