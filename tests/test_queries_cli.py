"""`refcache query` / `sql`: output formats, read-only enforcement, one-line errors for bad input."""

import argparse
import json
import shutil
import struct
import subprocess
import sys

import duckdb
import polars as pl
import pytest
from helpers import tree_digest
from synth import make_world

import queries
from queries import cli
from refcache import UserError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cliworld")
    return make_world(root, runs=(("r1", 0.1),), steps=60, probe_every=10, n_probe=16)


def run_cli(argv, capsys):
    """The queries subcommands through argparse, as the `refcache` dispatcher runs them."""
    parser = argparse.ArgumentParser(prog="refcache")
    cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


def error_of(argv, capsys) -> str:
    with pytest.raises(UserError) as e:
        run_cli(argv, capsys)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


def test_list_and_formats(world, capsys, tmp_path):
    rc, out = run_cli(["query"], capsys)
    assert rc == 0
    for name in ("drift", "displacement", "collapse", "length", "compare", "cache_overview", "train_eval_gap",
                 "effects"):
        assert f"\n{name} " in "\n" + out
    assert "--param min_falls=3" in out

    run = world["runs"][0]
    rc, out = run_cli(["query", "drift", "--run", run, "--format", "csv"], capsys)
    df = pl.read_csv(out.encode())
    want = queries.run_query(queries.connect([run]), "drift")
    assert df.shape == want.shape and df["chosen_drift_mean"].to_list() == pytest.approx(
        want["chosen_drift_mean"].to_list())
    rc, out = run_cli(["query", "collapse", "--run", run, "--param", "min_falls=2", "min_accuracy=0.5",
                       "--format", "json"], capsys)
    rows = json.loads(out)
    assert rows and all(r["n_falls"] >= 2 for r in rows)
    _, out = run_cli(["query", "length", "--run", run], capsys)
    assert "corr_summed" in out and "rows" in out
    pq_out = tmp_path / "d.parquet"
    run_cli(["query", "displacement", "--run", run, "--format", "parquet", "--output", pq_out], capsys)
    assert pl.read_parquet(pq_out).height == queries.run_query(queries.connect([run]), "displacement").height
    rc, out = run_cli(["sql", "SELECT split, count(*) AS n FROM examples GROUP BY split ORDER BY split",
                       "--run", run, "--format", "csv"], capsys)
    assert out.splitlines()[0] == "split,n" and len(out.splitlines()) == 3


def test_flags_before_or_after_the_name(world, capsys, tmp_path):
    run = world["runs"][0]
    want = run_cli(["query", "drift", "--run", run, "--format", "csv"], capsys)[1]
    assert want.startswith("run,split,step")
    assert run_cli(["query", "--run", run, "drift", "--format", "csv"], capsys)[1] == want
    assert run_cli(["query", "--format", "csv", "--run", run, "drift"], capsys)[1] == want
    a = run_cli(["query", "collapse", "--run", run, "--param", "min_falls=2", "--format", "csv"], capsys)[1]
    b = run_cli(["query", "--param", "min_falls=2", "collapse", "--run", run, "--format", "csv"], capsys)[1]
    assert a == b and len(a.splitlines()) > 1
    sql = "SELECT count(*) AS n FROM steps"
    assert run_cli(["sql", "--run", run, sql, "--format", "csv"], capsys)[1] == \
        run_cli(["sql", sql, "--run", run, "--format", "csv"], capsys)[1] == "n\n60\n"
    assert "give one SQL statement" in error_of(["sql", "--run", run], capsys)
    # report: a run written after --cache is still the run
    rc, _ = run_cli(["report", "--cache", world["cache"], world["eval_cache"], run, "--out", tmp_path / "r"],
                    capsys)
    assert rc == 0 and (tmp_path / "r" / "report.html").exists()
    # a run directory that happens to be named like a query stays a run
    named = tmp_path / "drift"
    shutil.copytree(run, named)
    assert "\ndrift " in "\n" + run_cli(["query", "--run", named], capsys)[1]  # no NAME: the list


def table_lines(out: str) -> list:
    """The table part of a `--format table` output (before the row count)."""
    lines = out.splitlines()
    return lines[: next(i for i, ln in enumerate(lines) if ln.endswith((" rows", " row")))]


def test_table_fits_the_terminal(world, capsys, monkeypatch):
    run = world["runs"][0]
    monkeypatch.setenv("COLUMNS", "80")
    _, out = run_cli(["query", "drift", "--run", run], capsys)
    assert max(len(ln) for ln in table_lines(out)) <= 80
    assert table_lines(out)[0].split()[:5] == ["run", "split", "step", "n_pairs", "chosen_drift_mean"]
    assert "columns not shown" in out and "rejected_drift_p90" in out and "--columns" in out
    assert "--format csv" in out
    _, out = run_cli(["query", "drift", "--run", run, "--columns", "step,accuracy,both_down_share"], capsys)
    assert table_lines(out)[0].split() == ["step", "accuracy", "both_down_share"] and "not shown" not in out
    assert "no column 'acc'" in error_of(["query", "drift", "--run", run, "--columns", "step,acc"], capsys)
    # a few wide rows: one line per column instead of a cut
    _, out = run_cli(["sql", "SELECT * FROM runs", "--run", run], capsys)
    assert max(len(ln) for ln in table_lines(out)) <= 80 and "not shown" not in out
    assert any(ln.split()[:2] == ["lr", "5e-06"] for ln in table_lines(out))
    monkeypatch.setenv("COLUMNS", "400")
    _, out = run_cli(["query", "drift", "--run", run], capsys)
    assert "not shown" not in out and "rejected_drift_p90" in table_lines(out)[0]


def test_numbers_by_magnitude(world, capsys):
    run = world["runs"][0]
    sql = ("SELECT 1e-6 AS lr, 2400.0 AS n_float, 2400 AS n_int, 0.59375 AS acc, -18.146067 AS d, "
           "2.86e-06 AS noise, 0.1 AS beta")
    _, out = run_cli(["sql", sql, "--run", run], capsys)
    _, _, row = table_lines(out)
    assert row.split() == ["1e-06", "2400", "2400", "0.5938", "-18.15", "2.86e-06", "0.1"], row
    from queries.fmt import format_column, num

    assert [num(x) for x in (1e-6, 5e-4, 2400.0, 0.0, 123456.7, 1234567.0, float("nan"), None)] == \
        ["1e-06", "0.0005", "2400", "0", "123457", "1234567", "NaN", "null"]
    assert format_column([0.1, 0.25, 2.0]) == ["0.10", "0.25", "2"]  # aligned decimals, integers as integers
    assert format_column([1.5, -18.146, 0.00001]) == ["1.5", "-18.15", "1e-05"]  # never a non-zero as 0.00


def test_cut_result_says_how_to_see_all(world, capsys, tmp_path):
    run = world["runs"][0]
    sql = "SELECT range AS i FROM range(100)"
    _, out = run_cli(["sql", sql, "--run", run], capsys)
    assert len(table_lines(out)) == 2 + 60
    assert "showing the first 60 of 100 rows; all rows: --max-rows 0" in out
    _, out = run_cli(["sql", sql, "--run", run, "--max-rows", "0"], capsys)
    assert len(table_lines(out)) == 2 + 100 and "note" not in out
    _, out = run_cli(["sql", sql, "--run", run, "--max-rows", "5"], capsys)
    assert len(table_lines(out)) == 2 + 5 and "first 5 of 100" in out
    # a table written to a file keeps every row and column
    run_cli(["query", "drift", "--run", run, "--output", tmp_path / "d.txt"], capsys)
    text = (tmp_path / "d.txt").read_text()
    assert "rejected_drift_p90" in text and "not shown" not in text
    assert len(table_lines(text)) == 2 + queries.run_query(queries.connect([run]), "drift").height


def test_no_rows_is_one_line_saying_what_that_means(world, capsys, tmp_path):
    """A table without rows is one line, "no rows: ..." in the query's own words (its header's `empty:` line),
    not its columns stood on end; csv keeps the header, for programs."""
    run = world["runs"][0]
    _, out = run_cli(["query", "displacement", "--run", run, "--param", "min_margin_gain=1e9"], capsys)
    assert out == ("no rows: no displaced pairs (no probe pair's chosen log-prob fell beyond the step-0 noise while "
                   "its margin grew)\n")
    _, out = run_cli(["sql", "SELECT 1 AS x WHERE false", "--run", run], capsys)
    assert out == "no rows: the statement returned nothing\n"
    run_cli(["query", "displacement", "--run", run, "--param", "min_margin_gain=1e9", "--output", tmp_path / "d"],
            capsys)
    assert (tmp_path / "d").read_text().startswith("no rows: no displaced pairs")
    _, out = run_cli(["query", "displacement", "--run", run, "--param", "min_margin_gain=1e9", "--format", "csv"],
                     capsys)
    assert out.startswith("run,rank,split,step,chosen_drift,") and out.count("\n") == 1
    # every diagnostic says what no rows means
    assert all(q.empty != "nothing matched" and q.empty in q.sql for q in queries.list_queries())


def test_help_describes_and_shows_defaults(capsys):
    from refcache.cli import build_parser

    parser = build_parser()
    for cmd, must in (("query", ["diagnostics:", "effects", "(default: table)", "(default: 60)"]),
                      ("sql", ["read-only", "near_identical", "(default: table)"]),
                      ("report", ["report.html", "TRL-style", "--top"])):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
        for m in must:
            assert m in out, (cmd, m)


def test_stage3_commands_start_without_torch(world, capsys):
    """`refcache query/sql/report` build only stage 3's parser (the other stages' flags load torch, which was most
    of a query's start-up): same commands, same help, and a query run through `refcache.cli.main` in a fresh
    process gives its rows without torch ever being imported."""
    from refcache.cli import build_parser

    def helps(parser):
        sub = parser._subparsers._group_actions[0].choices
        return {c: sub[c].format_help() for c in ("query", "sql", "report")}

    light = build_parser("query")
    assert set(light._subparsers._group_actions[0].choices) == {"query", "sql", "report"}
    assert helps(light) == helps(build_parser())
    assert "train" in build_parser("train")._subparsers._group_actions[0].choices
    run = world["runs"][0]
    code = ("import sys; from refcache.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules, rc)")
    for argv in (["query", "cache_overview", "--run", run, "--format", "csv"],
                 ["sql", "SELECT count(*) AS n FROM pairs", "--run", run, "--format", "csv"]):
        r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, check=False)
        lines = r.stdout.strip().splitlines()
        assert r.returncode == 0 and lines[-1] == "False 0", (argv, r.stdout[-500:], r.stderr[-500:])
        assert lines[0].startswith(("cache,", "n")) and len(lines) >= 3, lines


def test_cache_only_query(world, capsys):
    _, out = run_cli(["query", "cache_overview", "--cache", world["cache"], "--format", "csv"], capsys)
    assert "chosen_logp_per_token_p50" in out


@pytest.mark.parametrize("sql", [
    "COPY examples TO '{run}/examples/evil.parquet'",
    "COPY (SELECT 1) TO '{run}/steps.parquet'",
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO t VALUES (1)",
    "ATTACH '{run}/x.db' AS x",
    "SET enable_external_access = true",
    "EXPORT DATABASE '{run}/exp'",
    "SELECT 1; COPY (SELECT 1) TO '{run}/y.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{run}/z.csv'",
    "PRAGMA enable_profiling",
    "INSTALL httpfs",
    "CALL pragma_version()",
])
def test_sql_refuses_writes(world, capsys, sql):
    run = world["runs"][0]
    before = tree_digest(run, world["cache"])
    msg = error_of(["sql", sql.format(run=run), "--run", run], capsys)
    assert "refused" in msg or "statements" in msg
    assert tree_digest(run, world["cache"]) == before


def test_connection_is_locked_and_sandboxed(world, tmp_path):
    con = queries.connect(world["runs"])
    with pytest.raises(duckdb.Error):
        con.execute("SET enable_external_access = true")  # configuration is locked
    outside = tmp_path / "outside.csv"
    outside.write_text("a\n1\n")
    with pytest.raises(duckdb.Error):
        con.execute(f"SELECT * FROM read_csv('{outside}')")  # only the attached dirs are readable
    with pytest.raises(duckdb.Error):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path}/x.csv'")
    for ok in ["DESCRIBE examples", "SHOW TABLES", "EXPLAIN SELECT * FROM steps", "PRAGMA show_tables",
               "WITH a AS (SELECT 1 AS x) SELECT * FROM a", "SUMMARIZE steps"]:
        assert queries.run_sql(con, ok).height >= 1


def test_output_inside_run_refused(world, capsys):
    run = world["runs"][0]
    msg = error_of(["query", "drift", "--run", run, "--format", "csv", "--output", run / "steps.parquet"], capsys)
    assert "inside the run directory" in msg
    msg = error_of(["query", "drift", "--run", run, "--format", "parquet"], capsys)
    assert "--output" in msg


def test_bad_input_messages(world, capsys, tmp_path):
    run = world["runs"][0]
    assert "did you mean drift" in error_of(["query", "drfit", "--run", run], capsys)
    assert "malformed" in error_of(["query", "collapse", "--run", run, "--param", "min_falls"], capsys)
    assert "must be an integer" in error_of(["query", "collapse", "--run", run, "--param", "min_falls=two"], capsys)
    assert "must be in" in error_of(["query", "collapse", "--run", run, "--param", "min_accuracy=1.5"], capsys)
    assert "must be one of" in error_of(["query", "displacement", "--run", run, "--param", "split=test"], capsys)
    assert "unknown parameter 'beta'" in error_of(["query", "drift", "--run", run, "--param", "beta=1"], capsys)
    assert "not a run directory" in error_of(["query", "drift", "--run", tmp_path], capsys)
    assert "no such run directory" in error_of(["query", "drift", "--run", tmp_path / "nope"], capsys)
    assert "not a cache directory" in error_of(["query", "cache_overview", "--cache", tmp_path], capsys)
    msg = error_of(["sql", "SELECT * FROM stepz", "--run", run], capsys)
    assert "stepz" in msg and "views: pairs" in msg
    # a run whose config names no existing cache: queries that need pairs say what to pass
    lone = tmp_path / "lone"
    shutil.copytree(run, lone)
    cfg = json.loads((lone / "config.json").read_text())
    cfg["cache"] = cfg["eval_cache"] = str(tmp_path / "gone")
    (lone / "config.json").write_text(json.dumps(cfg))
    assert "--cache CACHE" in error_of(["query", "displacement", "--run", lone], capsys)
    assert "--run RUN" in error_of(["query", "drift", "--cache", world["cache"]], capsys)


def test_corrupt_parquet_is_one_line(world, capsys, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(world["runs"][0], bad)
    part = min((bad / "examples").glob("*.parquet"))
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])  # cut off mid-write: no footer
    msg = error_of(["query", "drift", "--run", bad], capsys)
    assert str(part) in msg and "corrupt" in msg
    # valid footer but damaged column data: caught when the query reads it, and the file is named
    end = len(data) - struct.unpack("<I", data[-8:-4])[0] - 8
    part.write_bytes(data[:4] + bytes(b ^ 0x5A for b in data[4:end]) + data[end:])
    with pytest.raises(UserError) as e:
        queries.run_query(queries.connect([bad], caches=[]), "drift")
    assert "\n" not in str(e.value) and str(part) in str(e.value) and "corrupt" in str(e.value)
    # a file that is not Parquet at all
    (bad / "steps.parquet").write_text("not parquet")
    assert "steps.parquet" in error_of(["query", "drift", "--run", bad], capsys)
