"""Progress that moves and reads in a log (refcache_base/progress.py): precompute's bar moves per forward batch,
not per scoring call; where stderr is not a terminal every stage prints plain lines (pairs or steps done/total,
rate, ETA, tokens/s) every REFCACHE_PROGRESS_SECONDS; an error never lands on the line of an unfinished bar."""

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import rows_of

from refcache.cli import main as cli_main
from refcache_base import UserError
from refcache_base.progress import SECONDS_ENV, Progress

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^(?P<desc>[\w .-]+): (?P<n>[\d,]+)/(?P<total>[\d,]+) (?P<unit>\w+) \((?P<pct>\d+)%\)(?P<rest>.*)$")


def progress_lines(text: str, desc: str) -> list:
    """The plain progress lines of `desc` in `text`, parsed: [(n, total, rest of the line)]."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m["desc"] == desc:
            out.append((int(m["n"].replace(",", "")), int(m["total"].replace(",", "")), m["rest"]))
    return out


def test_precompute_progress_moves_per_forward_batch_in_a_log_file(tmp_path, tiny_model_dir, prefs_dir):
    """40 pairs are one hf scoring call (pairs_per_call 256) of 5 forwards (8 pairs each at --batch-size 16): the
    log gets a plain line per forward with REFCACHE_PROGRESS_SECONDS=0, counts rising to 40/40, with tokens/s and an
    ETA; no carriage returns (tqdm's redraws) in the file."""
    data = rows_of(prefs_dir / "train.jsonl", tmp_path / "in.jsonl", 0, 40)
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, "-m", "refcache.cli", "precompute", str(data), "--model",
                            str(tiny_model_dir), "--out", str(tmp_path / "c"), "--backend", "hf", "--batch-size", "16"],
                           check=False, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, timeout=600,
                           env={**os.environ, SECONDS_ENV: "0"})
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text
    lines = progress_lines(text, "precompute")
    counts = [n for n, _, _ in lines]
    assert counts == [8, 16, 24, 32, 40], text  # a line per forward batch: more updates than the 1 scoring call
    assert all(total == 40 for _, total, _ in lines)
    assert all("tok_s=" in rest for _, _, rest in lines)
    assert all(re.search(r"[\d.]+ pairs/s, ETA \d\d:\d\d", rest) for _, _, rest in lines[1:-1]), text
    assert "rows read 40 = kept 40 + rejected 0" in r.stdout


def test_lines_every_n_seconds_and_at_the_end(monkeypatch, capsys):
    """Not a terminal (pytest captures stderr): a line when REFCACHE_PROGRESS_SECONDS have passed since the last
    one and the count moved, one at the end; a transient display leaves no line; a bad value is one clear error."""
    monkeypatch.setenv(SECONDS_ENV, "30")
    with Progress(100, "step", "run") as bar:
        for _ in range(5):
            bar.update(1, loss="0.69")
        assert capsys.readouterr().err == ""  # 30 s have not passed
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run: 5/100 steps (5%), ") and lines[0].endswith(", loss=0.69")
    assert re.search(r"steps/s, ETA \d\d:\d\d, elapsed 00:00", lines[0])

    monkeypatch.setenv(SECONDS_ENV, "0.2")
    bar = Progress(None, "pair", "precompute")
    bar.update(10)  # the first update: where the rate counts from
    time.sleep(0.25)
    bar.update(10, tok_s="1,000")  # 0.2 s have passed: a line
    bar.update(0)  # nothing moved: no line
    bar.update(5)  # within 0.2 s of the last line: none
    bar.close()  # the count moved since the last line: a last one
    bar.close()  # twice: nothing more
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("precompute: 20 pairs, ") and "ETA" not in lines[0]  # total unknown: no ETA
    rate = float(re.search(r"([\d.]+) pairs/s", lines[0])[1])
    assert 10 <= rate <= 10 / 0.25  # 10 pairs over the >= 0.25 s since the first update
    assert lines[0].endswith("tok_s=1,000") and lines[1].startswith("precompute: 25 pairs, ")

    with Progress(50, "row", "scan columns", transient=True) as bar:
        bar.update(50)
    with Progress(50, "row", "off", enabled=False) as bar:
        bar.update(50)
    assert capsys.readouterr().err == ""

    monkeypatch.setenv(SECONDS_ENV, "soon")
    with pytest.raises(UserError, match=r"^REFCACHE_PROGRESS_SECONDS=soon: give the seconds between progress "
                                        r"lines in a log, a number >= 0 \(0: a line at every update; default 30\)$"):
        Progress(10, "step", "run")


def test_training_prints_the_same_lines(tmp_path, train_cache, monkeypatch, capsys):
    """`refcache train` in a log: the same plain lines, steps done/total with the loss and tokens/s."""
    monkeypatch.setenv(SECONDS_ENV, "0")
    capsys.readouterr()
    assert cli_main(["train", "--cache", str(train_cache), "--out", str(tmp_path / "r"), "--steps", "4",
                     "--batch-size", "4", "--probe-every", "0", "--probe-size", "4"]) == 0
    err = capsys.readouterr().err
    lines = progress_lines(err, "r")
    assert [n for n, _, _ in lines] == [1, 2, 3, 4] and all(t == 4 for _, t, _ in lines), err
    assert all(re.search(r", loss=[\d.]+, margin=.*, tok_s=[\d,]+$", rest) for _, _, rest in lines), err
    assert "\r" not in err


def _read(fd, until: float, stop=None) -> bytes:
    """What the pty `fd` gives until EOF, `until` (time.monotonic()) or `stop(bytes so far)` is true."""
    out = b""
    while time.monotonic() < until and not (stop and stop(out)):
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            out += chunk
    return out


def test_an_error_never_shares_the_bar_s_line(tmp_path, train_cache):
    """`refcache train` on a terminal, stopped by Ctrl-C while its bar is drawn: the message starts a line of its
    own (the bar ends its line first) instead of landing after the bar's text."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    p = subprocess.Popen([sys.executable, "-m", "refcache.cli", "train", "--cache", str(train_cache), "--out",
                          str(tmp_path / "r"), "--steps", "2000", "--batch-size", "4", "--probe-every", "0",
                          "--probe-size", "4", "--checkpoint-every", "0"],
                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    try:
        seen = _read(master, time.monotonic() + 300, lambda out: re.search(rb"\| *[1-9]\d*/2000 \[", out))
        assert re.search(rb"\| *[1-9]\d*/2000 \[", seen), seen[-2000:]  # the bar is drawn and has moved
        p.send_signal(signal.SIGINT)
        seen += _read(master, time.monotonic() + 120)
        assert p.wait(timeout=60) == 130
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    at = text.index("refcache train: interrupted")
    assert text[:at].endswith("\n"), repr(text[max(0, at - 200):at + 40])
