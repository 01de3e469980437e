"""refcache: offline reference log-prob cache for DPO (command-line entry point and shared bits)."""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input or settings. The CLI prints it as one line, no traceback."""
