"""`refcache query`, `refcache sql`, `refcache report`."""

import io
import shutil
import sys
import textwrap
from pathlib import Path

import polars as pl

from refcache_base import UserError

FORMATS = ("table", "csv", "json", "parquet")
SQL_EMPTY = "the statement returned nothing"  # what no rows means for `refcache sql`
MAX_ROWS = 60  # table rows printed to a terminal unless --max-rows says otherwise


def _add_sources(p, runs_positional=False):
    if not runs_positional:
        p.add_argument("--run", nargs="+", action="extend", default=[], metavar="RUN",
                       help="run directory (the --out of `refcache train`); several allowed")
    p.add_argument("--cache", nargs="+", action="extend", default=None, metavar="CACHE",
                   help="cache directory; default: the caches named in the runs' config.json")


def _add_output(p):
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table: fitted to the terminal; csv/json/parquet: every row and column")
    p.add_argument("--output", metavar="FILE", help="write the result here instead of stdout "
                   "(required for --format parquet; a table written to a file keeps every row and column)")
    p.add_argument("--columns", metavar="NAME,NAME", help="only these columns, in this order")
    p.add_argument("--max-rows", type=int, default=MAX_ROWS, metavar="N",
                   help="table rows printed to the terminal; 0 = all")


def _query_description() -> str:
    from queries.runner import list_queries

    qs = list_queries()
    w = max(len(q.name) for q in qs)
    lines = "\n".join(_wrap(f"  {q.name:<{w}}  ", q.description) for q in qs)
    return ("Run a named diagnostic (one SQL file in queries/) over DuckDB views of the caches and run logs and\n"
            "print the result. Without NAME, list the diagnostics with their parameters.\n\n"
            f"diagnostics:\n{lines}\n\n"
            "examples:\n  refcache query drift --run runs/b0.1\n"
            "  refcache query --run runs/b0.1 displacement --param limit=30 --format csv --output top.csv")


def add_commands(sub):
    p = sub.add_parser("query", help="run a named diagnostic over caches and run logs (no NAME: list them)",
                       description=_query_description())
    p.add_argument("name", nargs="?", metavar="NAME", help="diagnostic to run; omit to list them")
    _add_sources(p)
    p.add_argument("--param", nargs="+", action="extend", default=[], metavar="K=V",
                   help="query parameter, e.g. --param min_falls=4 (`refcache query` lists each one's default)")
    _add_output(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "sql", help="ad-hoc read-only SQL on the views pairs, rejected_rows, steps, examples, runs",
        description="Run one read-only SQL statement (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN, SUMMARIZE) on the\n"
                    "views: pairs and rejected_rows (caches), steps, examples and runs (run logs), probe_noise;\n"
                    "macros: near_identical(a, b), rel_edit_distance(a, b), token_edit_distance(a, b),\n"
                    "wilson_low/high(k, n, z), table macro displaced(step, split, min_gain). Nothing is written.\n\n"
                    "example:\n  refcache sql \"SELECT step, avg(margin) FROM examples WHERE source = 'probe' "
                    "GROUP BY step ORDER BY step\" --run runs/b0.1")
    p.add_argument("sql", nargs="?", metavar="SQL", help="one statement, quoted")
    _add_sources(p)
    _add_output(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser(
        "report", help="write an HTML report with plots of the diagnostics for one or more runs",
        description="Write DIR/report.html (self-contained: plots inline) and its PNGs for one or more runs: the\n"
                    "findings that stand above noise, drift of chosen and rejected log-probs, margin and accuracy,\n"
                    "the TRL-style per-step curves (rewards/*, logps/*, loss, grad_norm, learning_rate), length\n"
                    "exploitation, collapse windows and the top displaced pairs with their text.\n\n"
                    "example:\n  refcache report runs/b0.1 runs/b0.5 --out report/")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories (the --out of `refcache train`)")
    _add_sources(p, runs_positional=True)
    p.add_argument("--out", default="report", metavar="DIR",
                   help="where report.html and its PNGs go, relative to the current directory (runs are only read)")
    p.add_argument("--top", type=int, default=None, metavar="N",
                   help="displaced pairs in the table and the findings (default: displacement's limit, "
                        f"{_default_top()})")
    p.set_defaults(func=cmd_report)


def _default_top() -> int:
    from queries.findings import default_top

    return default_top()


def _wrap(lead: str, text: str) -> str:
    """`lead` + `text` wrapped to the terminal width, continuation lines indented under the text."""
    width = max(60, shutil.get_terminal_size((100, 40)).columns - 2)
    return textwrap.fill(text, width, initial_indent=lead, subsequent_indent=" " * len(lead))


def _take_stray(args, accept):
    """`--run A B` swallows a positional written after it (`refcache query --run R drift`): return the first
    value of --run/--cache/--param that `accept` takes, removed from that list; None if there is none."""
    for attr in ("run", "cache", "param"):
        values = getattr(args, attr, None) or []
        for v in values:
            if accept(attr, v):
                values.remove(v)
                return v
    return None


def _connect(args):
    from queries.db import connect

    if not args.run and not args.cache:
        raise UserError("give at least one --run RUN (or --cache CACHE for cache_overview)")
    return connect(runs=args.run, caches=args.cache)


def _check_output_path(con, output):
    from queries.db import attached

    out = Path(output).expanduser().resolve()
    for kind, name, d in attached(con):
        if out == Path(d) or Path(d) in out.parents:
            raise UserError(f"--output {output} is inside the {kind} directory {d}: queries never write "
                            "into a cache or run; choose another path")


def _select_columns(df: pl.DataFrame, columns) -> pl.DataFrame:
    if not columns:
        return df
    names = [c.strip() for c in columns.split(",") if c.strip()]
    unknown = [c for c in names if c not in df.columns]
    if unknown:
        raise UserError(f"--columns: no column {unknown[0]!r} in this result (columns: {', '.join(df.columns)})")
    return df.select(names)


def emit(df: pl.DataFrame, fmt: str, output=None, con=None, columns=None, max_rows=MAX_ROWS, empty=SQL_EMPTY):
    """Write `df` as `fmt` to `output` or stdout. A table on stdout fits the terminal (see fmt.render_table);
    a table in a file, and every other format, holds all rows and columns. A table without rows is one line,
    "no rows: `empty`" (what that means; csv, json and parquet keep the columns)."""
    from queries.fmt import render_table

    if output and con is not None:
        _check_output_path(con, output)
    if max_rows is not None and max_rows < 0:
        raise UserError(f"--max-rows {max_rows}: give 0 (all rows) or a positive number")
    df = _select_columns(df, columns)
    if fmt == "parquet":
        if not output:
            raise UserError("--format parquet needs --output FILE")
        df.write_parquet(output)
    elif fmt == "csv":
        text = df.write_csv()
    elif fmt == "json":
        text = df.write_json()
    elif output:
        text = render_table(df, width=None, max_rows=None, empty=empty)
    else:
        text = render_table(df, width=shutil.get_terminal_size((120, 40)).columns, max_rows=max_rows,
                            more_hint="every row and column: --format csv, or --output FILE", empty=empty)
    if fmt != "parquet":
        if output:
            Path(output).write_text(text if text.endswith("\n") else text + "\n")
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if output:
        print(f"wrote {df.height} rows to {output}", file=sys.stderr)


def list_text() -> str:
    from queries.runner import list_queries

    buf = io.StringIO()
    qs = list_queries()
    w = max(len(q.name) for q in qs)
    for q in qs:
        buf.write(_wrap(f"{q.name:<{w}}  ", q.description) + "\n")
        for prm in q.params.values():
            buf.write(_wrap(f"{'':<{w}}    --param {prm.name}={prm.default}  ", prm.help) + "\n")
    buf.write("\nrun one: refcache query NAME --run RUN [--param K=V] [--format table|csv|json|parquet]\n")
    return buf.getvalue()


def cmd_query(args):
    from queries.runner import get_query, list_queries, parse_param_args, resolve_params, run_query

    if not args.name:  # `refcache query --run R drift`: the name went into --run
        names = {q.name for q in list_queries()}
        args.name = _take_stray(args, lambda attr, v: v in names and (attr == "param" or not Path(v).exists()))
    if not args.name:
        sys.stdout.write(list_text())
        return 0
    q = get_query(args.name)  # unknown name / bad params fail before any file is opened
    params = resolve_params(q, parse_param_args(args.param))
    con = _connect(args)
    emit(run_query(con, q.name, params), args.format, args.output, con, args.columns, args.max_rows, q.empty)
    return 0


def cmd_sql(args):
    from queries.db import check_read_only
    from queries.runner import run_sql

    if args.sql is None:  # `refcache sql --run R "SELECT ..."`: the statement went into --run
        args.sql = _take_stray(args, lambda attr, v: attr != "param" and " " in v.strip() and not Path(v).exists())
    if args.sql is None:
        raise UserError('give one SQL statement, e.g. refcache sql "SELECT * FROM runs" --run RUN')
    check_read_only(args.sql)
    con = _connect(args)
    emit(run_sql(con, args.sql), args.format, args.output, con, args.columns, args.max_rows)
    return 0


def _is_run_dir(v) -> bool:
    d = Path(v)
    return (d / "steps.parquet").exists() or (d / "examples").is_dir()


def cmd_report(args):
    from queries.report import write_report

    while (stray := _take_stray(args, lambda attr, v: attr == "cache" and _is_run_dir(v))) is not None:
        args.runs.append(stray)  # `refcache report --cache C RUN`: the run went into --cache
    if not args.runs:
        raise UserError("give at least one RUN directory (the --out of `refcache train`)")
    if args.top is not None and args.top < 1:
        raise UserError(f"--top {args.top}: give a positive number of pairs")
    path = write_report(args.runs, caches=args.cache or None, out_dir=args.out, top=args.top)
    print(f"report: {path}")
    return 0
