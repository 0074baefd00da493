"""The one error type for problems with the user's data (torch-free, so light tools can raise it)."""


class DataError(SystemExit):
    """A problem with the user's data, reported as one line (no traceback)."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
