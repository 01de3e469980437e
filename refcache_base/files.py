"""Writing a file so that a reader sees either the old one or the whole new one (temp file in the same folder,
fsync, rename), and a failed write leaves no half file. Every stage writes its files through these."""

import errno
import json
import os
import shutil
from pathlib import Path


def with_filename(e: OSError, path) -> OSError:
    """The same error, naming `path` when it names no file (pyarrow's and plain write errors do not), so the
    command line can say which file could not be written."""
    if e.filename:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path))


def atomic_write(path: Path, write, before_rename=None):
    """write(tmp_path), fsync, before_rename(tmp_path), then rename over `path`: readers see the old file or
    the whole new one. On an OSError (a full disk) the temp file is removed and the error names `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)  # __refcache__/ on its first file
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # ours, half written: free its space
        raise with_filename(e, path) from None
    except BaseException:  # Ctrl-C or SIGTERM mid-write: no half file left behind
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj):
    """`obj` as indented JSON, atomically (values JSON has no type for are written as their str)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def swap_dir(tmp, path):
    """Put the finished folder `tmp` in place of the folder `path`: the old one is moved aside first and removed
    after, so `path` is at every moment the old folder or the whole new one (or, after a kill between the two
    renames, absent with PATH.old beside it)."""
    path, old = str(path), str(path) + ".old"
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_torch(obj, path):
    """torch.save to a temp file, fsync, rename. A failed write (torch reports a full disk as a RuntimeError)
    becomes the OSError the command line turns into its disk-full line, and the temp file is removed."""
    import torch

    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) as "unexpected pos …"
        free = shutil.disk_usage(os.path.dirname(tmp) or ".").free
        os.remove(tmp)  # ours, half written: give the space back
        raise OSError(errno.ENOSPC if free < 64 << 20 else errno.EIO, f"torch.save failed: {e}", tmp) from e
    os.replace(tmp, path)
