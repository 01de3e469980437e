"""`refcache demo`'s stage-3 tables (refcache/demo.py show_diagnostics) on a synthetic run."""

import itertools
import re

from synth import make_world

import queries
from refcache.demo import SHOWN_ROWS, show_diagnostics


def test_per_step_tables_span_the_whole_run(tmp_path, capsys):
    """31 probe steps (0, 10, ..., 300): the drift table shows 12 of them spread evenly from the first to the last
    (not the first 12) and says so; a diagnostic without rows says what that means in one line."""
    w = make_world(tmp_path / "w", runs=(("r", 0.1),), steps=300, probe_every=10, n_probe=16, learn=0.0)
    show_diagnostics(queries.connect(w["runs"]), w["runs"][0])
    out = capsys.readouterr().out
    drift = out[out.index("-- drift (eval probes)"):out.index("-- displacement")]
    steps = [int(line.split()[1]) for line in drift.splitlines() if re.match(r"^eval\s+\d+\s", line)]
    assert len(steps) == SHOWN_ROWS == 12 and steps[0] == 0 and steps[-1] == 300, drift
    gaps = {b - a for a, b in itertools.pairwise(steps)}
    assert gaps <= {20, 30}, steps  # evenly spread: 30 intervals of 10 steps in 11 gaps
    assert "note: 12 of 31 probe steps, evenly spaced from the first to the last; all of it: refcache query " \
           "drift --run" in drift
    collapse = out[out.index("-- collapse"):out.index("-- length")]
    assert collapse.splitlines()[1].startswith("no rows: no collapse alarm"), collapse
