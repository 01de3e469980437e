"""`refcache query`, `refcache sql`, `refcache report`."""

import io
import shutil
import sys
from pathlib import Path

import polars as pl

from refcache import UserError

FORMATS = ("table", "csv", "json", "parquet")


def _add_sources(p, runs_positional=False):
    if not runs_positional:
        p.add_argument("--run", nargs="+", action="extend", default=[], metavar="RUN",
                       help="run directory (the --out of `refcache train`); several allowed")
    p.add_argument("--cache", nargs="+", action="extend", default=None, metavar="CACHE",
                   help="cache directory; default: the caches named in the runs' config.json")


def _add_output(p):
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--output", metavar="FILE", help="write the result here instead of stdout "
                   "(required for --format parquet)")


def add_commands(sub):
    p = sub.add_parser("query", help="run a named diagnostic over caches and run logs (no NAME: list them)",
                       description="Run a named diagnostic (queries/NAME.sql). Without NAME, list them.")
    p.add_argument("name", nargs="?", metavar="NAME")
    _add_sources(p)
    p.add_argument("--param", nargs="+", action="extend", default=[], metavar="K=V",
                   help="query parameter, e.g. --param min_falls=4 (see `refcache query` for the list)")
    _add_output(p)
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("sql", help="ad-hoc read-only SQL on the views pairs, rejected_rows, steps, examples, runs")
    p.add_argument("sql", metavar="SQL")
    _add_sources(p)
    _add_output(p)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("report", help="write an HTML report with plots of the diagnostics for one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN")
    _add_sources(p, runs_positional=True)
    p.add_argument("--out", default=None, metavar="DIR", help="default: RUN/report (the first RUN)")
    p.set_defaults(func=cmd_report)


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


def emit(df: pl.DataFrame, fmt: str, output=None, con=None):
    if output and con is not None:
        _check_output_path(con, output)
    if fmt == "parquet":
        if not output:
            raise UserError("--format parquet needs --output FILE")
        df.write_parquet(output)
    elif fmt == "csv":
        text = df.write_csv()
    elif fmt == "json":
        text = df.write_json()
    else:
        width = shutil.get_terminal_size((200, 40)).columns if sys.stdout.isatty() else 250
        with pl.Config(tbl_rows=60, tbl_cols=-1, tbl_width_chars=width, float_precision=4,
                       tbl_hide_dataframe_shape=True, fmt_str_lengths=40, tbl_hide_column_data_types=True):
            text = str(df) + f"\n{df.height} rows\n"
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
        buf.write(f"{q.name:<{w}}  {q.description}\n")
        for prm in q.params.values():
            buf.write(f"{'':<{w}}    --param {prm.name}={prm.default}  {prm.help}\n")
    buf.write("\nrun one: refcache query NAME --run RUN [--param K=V] [--format table|csv|json|parquet]\n")
    return buf.getvalue()


def cmd_query(args):
    from queries.runner import get_query, parse_param_args, resolve_params, run_query

    if not args.name:
        sys.stdout.write(list_text())
        return 0
    q = get_query(args.name)  # unknown name / bad params fail before any file is opened
    params = resolve_params(q, parse_param_args(args.param))
    con = _connect(args)
    emit(run_query(con, q.name, params), args.format, args.output, con)
    return 0


def cmd_sql(args):
    from queries.db import check_read_only
    from queries.runner import run_sql

    check_read_only(args.sql)
    con = _connect(args)
    emit(run_sql(con, args.sql), args.format, args.output, con)
    return 0


def cmd_report(args):
    from queries.report import write_report

    out = args.out or str(Path(args.runs[0]) / "report")
    path = write_report(args.runs, caches=args.cache, out_dir=out)
    print(f"report: {path}")
    return 0
