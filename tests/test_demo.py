"""`refcache demo`: end to end (hf backend, a few steps); a demo folder an earlier refcache made (the demo moves to
a new folder instead of failing on it, and leaves the old one as it was); its stage-3 tables (show_diagnostics)
on a synthetic run."""

import itertools
import json
import re

from helpers import tree_digest
from synth import make_world

import queries
from refcache.cli import main as cli_main
from refcache.demo import SHOWN_ROWS, show_diagnostics


def test_demo_runs_and_moves_past_an_older_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--backend", "hf", "--epochs", "0.02"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "findings:" in printed and (out / "report" / "report.html").exists()
    run = out / "runs" / "sigmoid-beta0.1"
    assert json.loads((run / "summary.json").read_text())["steps"] >= 1

    # the same run as an earlier refcache left it (its config predates the recorded lr schedule)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["lr_schedule"]
    (run / "config.json").write_text(json.dumps(cfg))
    before = tree_digest(out / "runs", out / "report")
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"note: {out} holds a demo this refcache cannot resume" in printed
    assert f"starting again in {tmp_path / 'demo-2'}" in printed
    assert (tmp_path / "demo-2" / "report" / "report.html").exists()
    assert tree_digest(out / "runs", out / "report") == before  # the older run and its report are left as they were


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
