"""Helpers shared by several test files (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import hashlib
from pathlib import Path

from refcache.cli import main as cli_main


def one_line_error(capsys, argv) -> str:
    """Run the CLI in this process on `argv` (items made str); it must exit 2 with exactly one line on stderr and
    no traceback. Returns that line, stripped."""
    capsys.readouterr()  # what earlier steps printed is not this command's output
    rc = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    line = err.strip()
    assert rc == 2, err
    assert err.count("\n") == 1 and line and "\n" not in line and "Traceback" not in err, err
    return line


def rows_of(src, dest, start=0, stop=None):
    """Write lines start..stop of the JSONL file `src` to `dest` (a small input made from the embedded data);
    returns `dest`."""
    dest.write_text("".join(src.read_text().splitlines(keepends=True)[start:stop]))
    return dest


def tree_digest(*dirs) -> dict:
    """{file: sha256} of every file under `dirs` (hidden ones too): equal before and after means nothing there was
    written, removed or left behind."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}
