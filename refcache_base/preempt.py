"""SIGTERM, the signal a scheduler sends before it kills a job (Slurm at a time limit or `scancel`, Kubernetes
before an eviction), handled like Ctrl-C: the command stops cleanly, keeps what it wrote, releases its lock and
says how to resume, with exit status 143 (128 + SIGTERM) so the scheduler still sees a terminated job.

    install()                # once, in the command line's main thread
    with at_step_end():      # a loop that can stop cleanly at the end of a unit of work
        for step ...:
            ...
            if requested():  # a SIGTERM came during this step: save, then raise Preempted
                ...

Outside `at_step_end` a SIGTERM raises `Preempted` at once (precompute's parts are written atomically, so the
part in progress is simply redone on resume). Inside it, the first SIGTERM only sets a flag that the loop reads
at the end of its step; a second one raises at once.
"""

import contextlib
import signal
import threading


class Preempted(KeyboardInterrupt):
    """The process received SIGTERM. A KeyboardInterrupt, so every cleanup that runs on Ctrl-C runs for it."""

    exit_status = 128 + signal.SIGTERM


_pending = False  # a SIGTERM arrived inside at_step_end and has not been acted on yet
_deferring = 0


def install():
    """Handle SIGTERM in this process (a no-op outside the main thread, where signals cannot be handled)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):
    global _pending
    if _deferring and not _pending:
        _pending = True
        return
    raise Preempted("stopped by SIGTERM")


@contextlib.contextmanager
def at_step_end():
    """Within: a first SIGTERM waits for the loop to call `requested()` at the end of its step."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        _pending = False


def requested(world=None) -> bool:
    """Whether a SIGTERM is pending; with a `world` of several processes, whether any of them has one (all
    processes then stop at the same step; one all-reduce of one number)."""
    if world is None or world.size == 1:
        return _pending
    return bool(world.max(int(_pending)))
