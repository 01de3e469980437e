"""refcache_base.lock.DirLock: one writer per directory; a second is refused; a dead holder's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from refcache import UserError
from refcache_base.lock import DirLock


def test_second_writer_refused_then_free(tmp_path):
    with DirLock(tmp_path, "precompute") as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=r"being written by another refcache precompute \(pid \d+"):
            DirLock(tmp_path, "train").acquire()
        DirLock(tmp_path, "precompute", name="shard-1-of-2").acquire().release()  # another name: allowed
    assert not lock.path.exists()
    DirLock(tmp_path, "train").acquire().release()


def test_stale_lock_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True,
                          text=True)
    pid = int(dead.stdout)  # that process has exited
    lock = DirLock(tmp_path, "train")
    lock.path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "what": "train", "since": "x"}))
    lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().err
    lock.release()


def test_other_host_refused_with_path(tmp_path):
    lock = DirLock(tmp_path, "merge")
    lock.path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "what": "merge", "since": "x"}))
    with pytest.raises(UserError, match="on host elsewhere.*delete"):
        lock.acquire()
