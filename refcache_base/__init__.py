"""The ground floor every stage imports, and that imports no stage: the error type commands print as one line,
the version, and small shared jobs in their own modules:

  lock           one writer per directory (DirLock)
  preempt        SIGTERM handled like Ctrl-C (a scheduler's time limit or eviction)
  files          atomic writes (temp file, fsync, rename)
  limits         allowed ranges of numbers, as interval strings ("[1, inf)"), with the one-line message
  progress       a long loop's progress: a bar on a terminal, a plain line every N seconds in a log
  cache_schema   the stage-1 cache's columns: the contract between stage 1 and stages 2 and 3
  runlog_schema  the run directory's logs: the contract between stage 2 and stage 3
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input or settings. The CLI prints it as one line, no traceback."""


class SettingsChanged(UserError):
    """An existing cache or run was made with other settings (or by an earlier refcache) than asked now, so it
    cannot be resumed. `refcache demo` moves to a new folder on it; every other command prints it."""
