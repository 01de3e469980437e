"""Named diagnostics: each `queries/<name>.sql` file, its header, its typed parameters, and running it.

Header format (comment lines at the top of the file):
    -- One-line description.                        (first line)
    -- param: NAME = DEFAULT [LO, HI] {a, b} help    (bounds and choices optional; DEFAULT's type is the type)
    -- param: NAME = 'DEFAULT' @VIEW help            (a column name of VIEW, e.g. `by` of slices.sql)
    -- needs: examples, pairs                        (views that must have at least one source; `ches`: a
                                                     cache with CHES scores, view `caches`)
    -- empty: no displaced pairs (...)              (what a result without rows means, printed instead of
                                                     an empty table: "no rows: <this>")
Parameters reach DuckDB as bound values (`$NAME`), never pasted into the SQL text. The exception is a
column-name parameter (@VIEW): identifiers cannot be bound, so its value must name a column of VIEW (looked up
on the connection) and `$NAME` is replaced by that column's name, quoted.
"""

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import polars as pl

from queries.db import check_read_only, one_line, view_sources
from queries.fmt import NOTHING
from refcache_base import UserError

QUERY_DIR = Path(__file__).parent

_PARAM_RE = re.compile(
    r"^--\s*param:\s*(?P<name>\w+)\s*=\s*(?P<default>'[^']*'|\S+)\s*"
    r"(?:\[(?P<lo>[^,\]]*),(?P<hi>[^\]]*)\])?\s*(?:\{(?P<choices>[^}]*)\})?\s*(?:@(?P<view>\w+))?\s*(?P<help>.*)$")


@dataclass
class Param:
    name: str
    default: object
    type: type
    lo: float | None = None
    hi: float | None = None
    choices: list | None = None
    help: str = ""
    column_of: str | None = None  # the value names a column of this view (substituted, not bound)

    def parse(self, value, query):
        """Typed, validated value from a Python value or a command-line string."""
        where = f"parameter {self.name} of {query}"
        try:
            if self.type is str:
                v = str(value)
                v = v[1:-1] if len(v) >= 2 and v[0] == v[-1] == "'" else v
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                v = int(value) if not isinstance(value, str) else int(value.strip(), 10)
            else:
                if isinstance(value, bool):
                    raise ValueError
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{where} must be {'an integer' if self.type is int else 'a number'}, "
                            f"got {value!r} (default {self.default!r})") from None
        if self.choices is not None and v not in self.choices:
            raise UserError(f"{where} must be one of {', '.join(self.choices)}, got {v!r}")
        if (self.lo is not None and v < self.lo) or (self.hi is not None and v > self.hi):
            rng = f"[{'' if self.lo is None else self.lo}, {'' if self.hi is None else self.hi}]"
            raise UserError(f"{where} must be in {rng}, got {v!r}")
        return v


@dataclass
class Query:
    name: str
    description: str
    params: dict = field(default_factory=dict)
    needs: list = field(default_factory=list)
    empty: str = NOTHING  # what a result without rows means (the header's `empty:` line)
    sql: str = ""
    path: Path | None = None


def _bound(s):
    s = s.strip()
    return float(s) if s else None


def parse_query(path: Path) -> Query:
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        header.append(line)
    q = Query(name=path.stem, description=header[0].lstrip("- ").strip() if header else "", sql=text, path=path)
    for line in header:
        m = _PARAM_RE.match(line)
        if m:
            d = m.group("default")
            if d.startswith("'"):
                typ, default = str, d[1:-1]
            elif re.fullmatch(r"-?\d+", d):
                typ, default = int, int(d)
            else:
                typ, default = float, float(d)
            choices = [c.strip() for c in m.group("choices").split(",")] if m.group("choices") else None
            q.params[m.group("name")] = Param(m.group("name"), default, typ, _bound(m.group("lo") or ""),
                                              _bound(m.group("hi") or ""), choices, m.group("help").strip(),
                                              m.group("view"))
        elif re.match(r"^--\s*needs:", line):
            q.needs = [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
        elif re.match(r"^--\s*empty:", line):
            q.empty = line.split(":", 1)[1].strip()
    return q


def list_queries() -> list[Query]:
    """All named diagnostics, sorted by name (`.name`, `.description`, `.params`)."""
    return [parse_query(p) for p in sorted(QUERY_DIR.glob("*.sql")) if not p.name.startswith("_")]


def get_query(name: str) -> Query:
    path = QUERY_DIR / f"{name}.sql"
    if not re.fullmatch(r"[A-Za-z0-9]\w*", name or "") or not path.exists():
        names = [q.name for q in list_queries()]
        close = difflib.get_close_matches(name or "", names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"unknown query {name!r}: {hint}known: {', '.join(names)}")
    return parse_query(path)


def parse_param_args(items) -> dict:
    """['k=v', ...] from the command line -> {k: 'v'}; a malformed item is a one-line error."""
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", k.strip()):
            raise UserError(f"--param {item!r} is malformed: write NAME=VALUE, e.g. --param min_falls=3")
        out[k.strip()] = v.strip()
    return out


def resolve_params(q: Query, params=None) -> dict:
    params = dict(params or {})
    unknown = [k for k in params if k not in q.params]
    if unknown:
        known = ", ".join(f"{p.name}={p.default!r}" for p in q.params.values()) or "none"
        raise UserError(f"unknown parameter {unknown[0]!r} for query {q.name} (parameters: {known})")
    return {name: (p.parse(params[name], q.name) if name in params else p.default)
            for name, p in q.params.items()}


def _find_unreadable_parquet(con):
    """After a read error: the first attached Parquet file that does not decode, with the reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from queries.db import attached

    for _, _, d in attached(con):
        for f in sorted(Path(d).rglob("*.parquet")):
            try:
                pq.read_table(f)
            except (pa.ArrowException, OSError) as e:  # a decode failure names this file
                return f, one_line(e)
    return None, None


def _execute(con, sql, values=None) -> pl.DataFrame:
    try:
        return con.sql(sql, params=values or None).pl()
    except (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException) as e:
        msg = one_line(e)
        if isinstance(e, duckdb.CatalogException):
            msg += " (views: pairs, rejected_rows, steps, examples, runs)"
        raise UserError(msg) from None
    except duckdb.Error as e:
        bad, why = _find_unreadable_parquet(con)
        if bad is not None:
            raise UserError(f"{bad}: unreadable Parquet ({why}); it is corrupt: re-create it or remove it") from None
        raise UserError(one_line(e)) from None


def run_query(con, name: str, params=None) -> pl.DataFrame:
    """Run named diagnostic `name` with `params` ({name: value}, strings or Python values) -> Polars."""
    q = get_query(name)
    values = resolve_params(q, params)
    have = view_sources(con)
    for view in q.needs:
        if view == "ches":  # a cache with CHES scores; else the caches' own reasons, one line
            n, why = con.execute("SELECT count(*) FILTER (WHERE ches_missing IS NULL), "
                             "string_agg(cache || ': ' || ches_missing, '; ') FROM caches").fetchall()[0]
            if not n:
                raise UserError(f"query {name} needs CHES scores: {why}")
        elif not have.get(view):
            what = {"pairs": "a cache: pass --cache CACHE (no cache named in the runs' config.json exists)",
                    "examples": "run logs with examples/*.parquet: pass --run RUN",
                    "steps": "run logs with steps.parquet: pass --run RUN"}.get(view, f"the {view} view")
            raise UserError(f"query {name} needs {what}")
    sql = q.sql
    for p in q.params.values():
        if p.column_of:  # an identifier: checked against the view, then written into the SQL quoted
            column = column_name(con, p.column_of, values.pop(p.name), f"parameter {p.name} of {name}")
            quoted = '"' + column.replace('"', '""') + '"'
            sql = re.sub(rf"\${p.name}\b", lambda _, quoted=quoted: quoted, sql)
    return _execute(con, sql, values)


def column_name(con, view: str, value: str, where: str) -> str:
    """The column of `view` that `value` names (DuckDB compares names case-insensitively), as the view spells
    it; a one-line UserError listing the input's own columns and the rest otherwise."""
    from refcache_base.cache_schema import RESERVED_NAMES

    names = [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]
    match = [n for n in names if n.lower() == str(value).lower()]
    if match:
        return match[0]
    if view != "pairs":
        raise UserError(f"{where}: no column {value!r} in the {view} view; columns: {', '.join(names)}")
    own = [n for n in names if n.lower() not in RESERVED_NAMES]
    raise UserError(f"{where}: no column {value!r} in the pairs view; the input's own columns: "
                    f"{', '.join(own) or 'none'}; other columns: {', '.join(n for n in names if n not in own)}")


def run_sql(con, sql: str) -> pl.DataFrame:
    """Ad-hoc read-only SQL against the views -> Polars."""
    check_read_only(sql)
    return _execute(con, sql)
