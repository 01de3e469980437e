"""An exclusive lock on a directory that refcache writes (a cache, a run), held by one process at a time.

    with DirLock(cache_dir, "precompute"):      # creates cache_dir/.refcache-lock (or refuses)
        ...

The lock is a file created with O_CREAT | O_EXCL holding {pid, host, what, since}. A second writer is refused
with one line naming the holder. While held, a thread touches the file every HEARTBEAT_S seconds. A lock is
stale when its holder is gone: on the same host, its pid no longer runs; on another host (a job on shared
storage whose node died or was killed after a scheduler's grace period), its file has not been touched for
STALE_S seconds (env REFCACHE_LOCK_STALE_S; default 10 minutes, far above the heartbeat, so clocks that differ
by minutes between nodes do not matter). A stale lock is taken over with a note on stderr. `name` tells several
locks in one directory apart (e.g. one per shard, so shards of one cache run side by side).
"""

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from refcache_base import UserError

LOCK_PREFIX = ".refcache-lock"
HEARTBEAT_S = 30.0


def stale_seconds() -> float:
    return float(os.environ.get("REFCACHE_LOCK_STALE_S", "600"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class DirLock:
    def __init__(self, directory, what: str, name: str = ""):
        self.dir = Path(directory)
        self.what = what
        self.path = self.dir / (LOCK_PREFIX + (f"-{name}" if name else ""))
        self.held = False
        self._stop = None  # the heartbeat's stop event while held

    def acquire(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(3):  # a stale lock removed by us, or a race with another process taking it over
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # being written right now, or unreadable: look again shortly
                    time.sleep(0.2)
                    holder = self._holder()
                if holder is None:
                    raise UserError(f"{self.path}: lock file is unreadable; if no refcache job is writing "
                                    f"{self.dir}, delete it and re-run") from None
                gone = self._gone(holder, me["host"])
                if gone:
                    print(f"note: {self.path}: taking over a stale lock of {holder.get('what', 'a job')} "
                          f"({gone})", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                where = "" if holder.get("host") == me["host"] else f" on host {holder.get('host')}"
                hint = "" if not where else (f"; if that job is dead, delete {self.path} (or wait: a lock not "
                                             f"renewed for {stale_seconds():.0f} s is taken over)")
                raise UserError(f"{self.dir} is being written by another refcache {holder.get('what', 'job')} "
                                f"(pid {holder.get('pid')}{where}, since {holder.get('since')}); wait for it "
                                f"to finish or use another directory{hint}") from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError:  # e.g. a full disk: leave no empty lock file behind
                self.path.unlink(missing_ok=True)
                raise
            self.held = True
            self._stop = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True,
                             name=f"refcache-lock-{self.path.name}").start()
            return self
        raise UserError(f"{self.path}: could not take the lock; re-run")

    def _gone(self, holder: dict, host: str) -> str | None:
        """Why the holder is known to be gone (the lock is stale), or None while it may be alive."""
        if holder.get("host") == host:
            pid = holder.get("pid")
            return None if isinstance(pid, int) and _alive(pid) else f"pid {pid} is no longer running"
        try:
            idle = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        limit = stale_seconds()
        return f"host {holder.get('host')} has not renewed it for {idle:.0f} s > {limit:.0f} s" if idle > limit else None

    def _heartbeat(self, stop: threading.Event):
        """Touch the lock file while it is held, so another host can tell a live holder from a dead one."""
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed or unwritable: nothing to renew
                return

    def _holder(self):
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def release(self):
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
