"""`refcache demo` end to end (hf backend, a few steps), and a demo folder an earlier refcache made: the demo
moves to a new folder instead of failing on it, and leaves the old one as it was."""

import json

from helpers import tree_digest

from refcache.cli import main as cli_main


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
