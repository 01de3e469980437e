"""An exclusive lock on a directory that refcache writes (a cache, a run), held by one process at a time.

    with DirLock(cache_dir, "precompute"):      # creates cache_dir/.refcache-lock (or refuses)
        ...

The lock is a file created with O_CREAT | O_EXCL holding {pid, host, what, since}. A second writer is refused
with one line naming the holder. A lock whose holder is gone (same host, pid no longer running) is stale: it
is taken over with a note on stderr. A lock from another host cannot be checked from here, so it is refused
with the path to delete once that job is known to be dead. `name` tells several locks in one directory apart
(e.g. one per shard, so shards of one cache run side by side).
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

from refcache import UserError

LOCK_PREFIX = ".refcache-lock"


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
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    print(f"note: {self.path}: taking over a stale lock of {holder.get('what', 'a job')} "
                          f"(pid {holder.get('pid')} is no longer running)", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                where = "" if holder.get("host") == me["host"] else f" on host {holder.get('host')}"
                hint = "" if not where else f"; if that job is dead, delete {self.path}"
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
            return self
        raise UserError(f"{self.path}: could not take the lock; re-run")

    def _holder(self):
        try:
            d = json.loads(self.path.read_text())
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
