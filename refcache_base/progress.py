"""Progress of a long loop, shown the same way by every stage: a tqdm bar on a terminal, plain lines in a log.

tqdm redraws one line with carriage returns. Where stderr is not a terminal (a batch job's log, `2> file`, a
pipe) those redraws pile up as one ever-longer line without a newline, which `tail -f` and `grep` cannot follow.
There `Progress` prints a plain line instead, every REFCACHE_PROGRESS_SECONDS seconds (default 30; 0: at every
update) while the count moves, and a last one when it closes:

    precompute: 512/2,403 pairs (21%), 17.6 pairs/s, ETA 01:47, elapsed 00:30, tok_s=663

The rate and the ETA count from the first update, so a model's or engine's start before it does not drag them.

    bar = Progress(total, "pair", "precompute")     # enabled=False: does nothing
    bar.update(n, tok_s="663")                      # n more done; the fields after the counts (tqdm's postfix)
    bar.close()                                     # or `with Progress(...) as bar:`

`close_all()` ends every open display; the command line calls it before it prints an error, so that the error
starts a line of its own. `say(line)` prints a line above an open bar.
"""

import math
import os
import sys
import time
import weakref

from refcache_base import UserError

SECONDS_ENV = "REFCACHE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
_open = weakref.WeakSet()  # displays not closed yet


def line_seconds() -> float:
    """Seconds between two progress lines in a log, from REFCACHE_PROGRESS_SECONDS (default 30)."""
    raw = os.environ.get(SECONDS_ENV, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UserError(f"{SECONDS_ENV}={raw}: give the seconds between progress lines in a log, a number >= 0 "
                        f"(0: a line at every update; default {DEFAULT_SECONDS:g})")
    return seconds


def redraws() -> bool:
    """Whether stderr shows a bar redrawn in place: a terminal, or a Jupyter kernel (tqdm.auto's widget)."""
    if sys.stderr.isatty():
        return True
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def say(line: str) -> None:
    """Print `line` on stderr, above any tqdm bar there (the bar is redrawn below it)."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        print(line, file=sys.stderr, flush=True)


def close_all() -> None:
    """Close every open display (each bar ends its line)."""
    for p in list(_open):
        p.close()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A count of `unit`s (total None: unknown) from `initial`. `transient`: a short phase whose display goes away
    when it closes (no last line in a log)."""

    def __init__(self, total, unit: str, desc: str, *, initial: int = 0, enabled: bool = True,
                 transient: bool = False):
        self.total, self.unit, self.desc, self.n = total, unit, desc, initial
        self.transient, self.postfix, self.bar = transient, {}, None
        self.closed = not enabled
        if not enabled:
            return
        if redraws():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                            leave=not transient)
        else:
            self.every = line_seconds()
            self.t0 = self.last = time.monotonic()  # opened; the last line printed
            self.first = None  # (time, n) at the first update: where the rate counts from
            self.shown = initial  # the count the last line showed
        _open.add(self)

    def update(self, n: int = 0, **postfix) -> None:
        """`n` more done; `postfix` replaces the fields shown after the counts (strings, e.g. tok_s="1,591")."""
        if self.closed:
            return
        self.n += n
        if postfix:
            self.postfix = postfix
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.first is None and n:
            self.first = (now, self.n)
        if self.n != self.shown and now - self.last >= self.every:
            self._line(now)

    def _line(self, now: float) -> None:
        units = self.unit + ("" if self.unit.endswith("s") else "s")
        parts = [f"{self.n:,}/{self.total:,} {units} ({100 * self.n / max(self.total, 1):.0f}%)"
                 if self.total is not None else f"{self.n:,} {units}"]
        if self.first is not None and now > self.first[0] and self.n > self.first[1]:
            rate = (self.n - self.first[1]) / (now - self.first[0])
            parts.append(f"{rate:,.0f} {units}/s" if rate >= 100 else f"{rate:.3g} {units}/s")
            if self.total is not None and self.n < self.total:
                parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts.append(f"elapsed {_clock(now - self.t0)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(f"{self.desc}: " + ", ".join(parts), file=sys.stderr, flush=True)
        self.last, self.shown = now, self.n

    def close(self) -> None:
        """End the display: a bar ends its line; in a log, a last line if the count moved since the last one."""
        if self.closed:
            return
        self.closed = True
        _open.discard(self)
        if self.bar is not None:
            self.bar.close()
        elif not self.transient and self.n != self.shown:
            self._line(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
