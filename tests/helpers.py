"""Helpers shared by several test files (pytest puts tests/ on sys.path: `from helpers import ...`)."""

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
