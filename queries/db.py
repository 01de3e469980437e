"""A read-only DuckDB connection with views over stage-1 caches and stage-2 run directories.

Views (all read straight from the Parquet files, nothing is copied):

  pairs          union of the parts each cache's manifest lists (checked first by pipeline.cache.check_parts:
                 a missing, extra or changed part is refused), plus `cache` (the cache dir name) and
                 `length_diff = chosen_len - rejected_len`; the input's own columns under their names
                 (manifest `extra_columns`; null for a cache that lacks one); a schema-1 cache's `ches` and
                 `ln_ches` are null
  rejected_rows  union of the caches' rejected rows (__refcache__/rejected_rows.parquet), plus `cache`;
                 `reason_kind` (pipeline/reject.py) is null for a file written before it
  caches         one row per cache from its manifest: cache, dir, schema_version, backend, dtype, rows,
                 ches_missing (null when the cache has CHES; else why not: cache_schema.ches_missing_reason)
  steps          union of the runs' steps.parquet, plus `run` (the run dir name)
  examples       union of the runs' examples/*.parquet, plus `run`
  runs           one row per run from config.json and summary.json (loss, beta, lr, cache paths, ...)
  view_sources   how many Parquet sources each view has (0 = empty view); attached: the dirs behind them

plus the shared definitions in `_shared.sql`: macros token_edit_distance / rel_edit_distance / near_identical,
the view probe_noise (step-0 float noise per run) and the table macros probe_rows(...) and displaced(...).

After the views are made the connection may only read files under the given directories
(`enable_external_access = false`, `allowed_directories`) and its configuration is locked.
`run_sql` additionally refuses any statement that is not a read (see `check_read_only`).
"""

import json
import re
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import cache as pcache
from pipeline.fingerprint import file_sha256
from refcache_base import UserError
from refcache_base.cache_schema import (
    CACHE_SCHEMA,
    REJECTED_REQUIRED,
    REJECTED_SCHEMA,
    V2_COLUMNS,
    ches_missing_reason,
    contract_schema,
)
from refcache_base.runlog_schema import EXAMPLES_SCHEMA, STEPS_SCHEMA

SHARED_SQL = Path(__file__).parent / "_shared.sql"  # macros and views every diagnostic uses

_DUCK_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.float64(): "DOUBLE",
               pa.float32(): "FLOAT", pa.bool_(): "BOOLEAN", pa.list_(pa.int32()): "INTEGER[]",
               pa.list_(pa.float32()): "FLOAT[]"}

# `runs` view columns: name -> (keys looked up (_lookup) in config.json, then in summary.json; DuckDB type).
# The keys are those the writers use: `refcache train` (config.json: dpo/train.py, the TrainConfig fields plus
# loss_params, total_steps, cache_fingerprint, ...; summary.json: dpo/runlog.py) and tests/synth.py (steps, not
# total_steps; no cache_fingerprint).
_RUN_FIELDS = {
    "run_id": (("run_id",), "VARCHAR"),
    "loss": (("loss",), "VARCHAR"),
    "beta": (("beta",), "DOUBLE"),
    "label_smoothing": (("label_smoothing",), "DOUBLE"),
    "lr": (("lr",), "DOUBLE"),
    "batch_size": (("batch_size",), "BIGINT"),
    "steps": (("total_steps", "steps"), "BIGINT"),
    "epochs": (("epochs",), "DOUBLE"),
    "seed": (("seed",), "BIGINT"),
    "dtype": (("dtype",), "VARCHAR"),
    "model": (("model",), "VARCHAR"),
    "cache": (("cache",), "VARCHAR"),
    "eval_cache": (("eval_cache",), "VARCHAR"),
    "cache_fingerprint": (("manifest_sha256",), "VARCHAR"),
    "live_ref": (("live_ref",), "BOOLEAN"),
    "final_loss": (("final_loss",), "DOUBLE"),
}


def _lit(s) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _escape_glob(path) -> str:
    """`path` as a DuckDB glob pattern that matches only itself: each pattern character ([ ] * ?) in a class
    of its own ([[] ...)."""
    return re.sub(r"([\[\]*?])", r"[\1]", str(path))


def _files(paths) -> str:
    """A DuckDB list literal of exact file paths. read_parquet takes every path as a glob pattern, so each is
    escaped: a run named 'g[12]' reads its own files, never g1's."""
    return "[" + ", ".join(_lit(_escape_glob(p)) for p in paths) + "]"


def _empty_select(schema: pa.Schema, extra: str) -> str:
    cols = ", ".join(f"NULL::{_DUCK_TYPES[f.type]} AS \"{f.name}\"" for f in schema)
    return f"SELECT NULL::VARCHAR AS {extra}, {cols} WHERE false"


def _check_parquet(path: Path, schema, what: str) -> pa.Schema:
    """Footer check: readable and has the contract's columns (a schema, or the names required). Names the file and
    what to do. Returns the file's schema."""
    try:
        have = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: cannot read this {what} Parquet file ({str(e).splitlines()[0]}); "
                        f"it is corrupt or was cut off: re-create it or remove it") from None
    names = schema.names if isinstance(schema, pa.Schema) else schema
    missing = [n for n in names if n not in have.names]
    if missing:
        raise UserError(f"{path}: this {what} file lacks column(s) {', '.join(missing)}: "
                        f"it was not written by this refcache version")
    return have


def _unique_names(dirs):
    names, seen = [], {}
    for d in dirs:
        n = d.name
        if n in seen:  # same dir name twice: qualify with the parent
            n = f"{d.parent.name}/{d.name}"
        seen[n] = d
        names.append(n)
    if len(set(names)) != len(names):
        raise UserError(f"two directories share the name(s) {sorted({n for n in names if names.count(n) > 1})}; "
                        "give each run or cache a distinct name")
    return names


def _find_cache_path(value, run_dir: Path):
    if not value:
        return None
    p = Path(value)
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, run_dir / p, run_dir.parent / p]):
        if pcache.is_cache(cand) or any(cand.glob("part-*.parquet")):
            return cand.resolve()
    return None


def _lookup(d: dict, keys):
    """First non-null plain value under one of `keys`, at the top level or one level down
    (e.g. {"loss_params": {"beta": 0.1}} or {"cache_fingerprint": {"manifest_sha256": ...}})."""
    for k in keys:
        if d.get(k) is not None and not isinstance(d[k], (dict, list)):
            return d[k]
    for v in d.values():
        if isinstance(v, dict):
            for k in keys:
                if v.get(k) is not None and not isinstance(v[k], (dict, list)):
                    return v[k]
    return None


def _run_cache_paths(config: dict):
    """Cache dirs a run's config names: the absolute path in the recorded fingerprint first, then the path
    as given (which may be relative to where training ran)."""
    out = []
    for fp_key, key in (("cache_fingerprint", "cache"), ("eval_cache_fingerprint", "eval_cache")):
        fp = config.get(fp_key)
        out.append([fp.get("path") if isinstance(fp, dict) else None, config.get(key)])
    return out


def _read_json(path: Path):
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore or delete it") from None


def load_run_dir(run) -> dict:
    """Validate one run directory; return {dir, config, summary, steps (file or None), examples (files)}."""
    d = Path(run).expanduser()
    if not d.is_dir():
        raise UserError(f"{run}: no such run directory (expected the --out of `refcache train`)")
    steps = d / "steps.parquet"
    examples = sorted(f.resolve() for f in (d / "examples").glob("*.parquet"))
    if not steps.exists() and not examples:
        raise UserError(f"{run}: not a run directory (no steps.parquet and no examples/*.parquet); "
                        "pass the --out of `refcache train`")
    if steps.exists():
        _check_parquet(steps, STEPS_SCHEMA, "steps")
    for f in examples:
        _check_parquet(f, EXAMPLES_SCHEMA, "examples")
    return {"dir": d.resolve(), "config": _read_json(d / "config.json"), "summary": _read_json(d / "summary.json"),
            "steps": steps.resolve() if steps.exists() else None, "examples": examples}


def load_cache_dir(cache) -> dict:
    """A cache's manifest and its part files, through the reader training uses (pipeline.cache.check_parts)."""
    d = Path(cache).expanduser()
    if not d.is_dir():
        raise UserError(f"{cache}: no such cache directory (expected the --out of `refcache precompute`)")
    manifest = pcache.read_manifest(d)
    parts = pcache.check_parts(d, manifest)
    for f in parts:
        _check_parquet(f, contract_schema(manifest["schema_version"]), "cache")
    rej = pcache.rejected_path(d, manifest)
    kinds = rej.exists() and "reason_kind" in _check_parquet(rej, REJECTED_REQUIRED, "rejected-rows").names
    return {"dir": d.resolve(), "parts": [f.resolve() for f in parts], "rejected": rej if rej.exists() else None,
            "rejected_kinds": kinds, "manifest": manifest}


def _check_run_caches(run_info, cache_info):
    """Refuse to join runs to a cache they did not train on: every attached cache must be, by content
    (pipeline.cache.same_cache), the train or eval cache of one of the runs that recorded theirs. A cache
    rebuilt at the same path with another model or other data is caught here, not joined row by row."""
    recorded = [(r, fp) for r in run_info for fp in (r["config"].get("cache_fingerprint"),
                                                     r["config"].get("eval_cache_fingerprint")) if fp]
    if not recorded:
        return  # no runs, or runs that recorded no cache
    for c in cache_info:
        sha = file_sha256(pcache.manifest_path(c["dir"]))
        if not any(pcache.same_cache(fp, c["manifest"], sha) for _, fp in recorded):
            mine = [r for r, fp in recorded if isinstance(fp, dict) and fp.get("path")
                    and Path(fp["path"]).resolve() == c["dir"]]
            why = (f"the cache at {c['dir']} is not the one {mine[0]['dir'].name} trained on (rebuilt or replaced "
                   "since: its content differs from what the run's config.json records)" if mine else
                   f"{c['dir']} is not the cache any of the given runs trained on")
            raise UserError(f"{why}; its pairs would be joined to the wrong examples. Pass --cache with the "
                            "cache the run used, or query the cache without the run")


def connect(runs=(), caches=None, *, threads=None) -> duckdb.DuckDBPyConnection:
    """In-memory DuckDB with the views above. `caches=None` attaches the caches the runs' configs name."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if isinstance(caches, (str, Path)):
        caches = [caches]
    run_info = [load_run_dir(r) for r in runs]
    if caches is None:
        found = []
        for r in run_info:
            for cands in _run_cache_paths(r["config"]):
                p = next((q for q in (_find_cache_path(c, r["dir"]) for c in cands if isinstance(c, str)) if q),
                         None)
                if p and p not in found:
                    found.append(p)
        caches = found
    cache_info, seen = [], set()
    for c in caches:
        info = load_cache_dir(c)
        if info["dir"] not in seen:
            seen.add(info["dir"])
            cache_info.append(info)
    _check_run_caches(run_info, cache_info)

    con = duckdb.connect(":memory:")
    # spill files (large sorts) go to the system's temp folder, not ./.tmp wherever the command runs
    con.execute(f"SET temp_directory = {_lit(Path(tempfile.gettempdir()) / 'refcache-duckdb')}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    run_names = _unique_names([r["dir"] for r in run_info])
    cache_names = _unique_names([c["dir"] for c in cache_info])

    def union(selects, empty):
        return " UNION ALL BY NAME ".join(selects) if selects else empty

    def v1_nulls(c):  # a schema-1 cache has no ches / ln_ches: null, as load_table gives them
        if c["manifest"]["schema_version"] != 1:
            return ""
        return "".join(f"NULL::DOUBLE AS {col}, " for col in V2_COLUMNS)

    pairs = [f"SELECT {_lit(n)} AS cache, *, {v1_nulls(c)}chosen_len - rejected_len AS length_diff "
             f"FROM read_parquet({_files(c['parts'])})"
             for n, c in zip(cache_names, cache_info) if c["parts"]]
    empty_pairs = (_empty_select(CACHE_SCHEMA, "cache").replace(" WHERE false", "") +
                   ", NULL::INTEGER AS length_diff WHERE false")
    con.execute(f"CREATE VIEW pairs AS {union(pairs, empty_pairs)}")
    rejected = [f"SELECT {_lit(n)} AS cache, *{'' if c['rejected_kinds'] else ', NULL::VARCHAR AS reason_kind'} "
                f"FROM read_parquet({_files([c['rejected']])})"  # reason_kind: null in a file from before it
                for n, c in zip(cache_names, cache_info) if c["rejected"]]
    con.execute(f"CREATE VIEW rejected_rows AS {union(rejected, _empty_select(REJECTED_SCHEMA, 'cache'))}")
    _caches_view(con, cache_names, cache_info)
    steps = [f"SELECT {_lit(n)} AS run, * FROM read_parquet({_files([r['steps']])})"
             for n, r in zip(run_names, run_info) if r["steps"]]
    con.execute(f"CREATE VIEW steps AS {union(steps, _empty_select(STEPS_SCHEMA, 'run'))}")
    examples = [f"SELECT {_lit(n)} AS run, * FROM read_parquet({_files(r['examples'])})"
                for n, r in zip(run_names, run_info) if r["examples"]]
    con.execute(f"CREATE VIEW examples AS {union(examples, _empty_select(EXAMPLES_SCHEMA, 'run'))}")

    rows = []
    for n, r in zip(run_names, run_info):
        row = {"run": n, "run_dir": str(r["dir"])}
        for col, (keys, _) in _RUN_FIELDS.items():
            v = _lookup(r["config"], keys)
            if v is None:
                v = _lookup(r["summary"], keys)
            row[col] = v
        fp = r["config"].get("cache_fingerprint")
        if isinstance(fp, dict) and fp.get("manifest_sha256"):
            row["cache_fingerprint"] = fp["manifest_sha256"]
        row["finished"] = bool(r["summary"])
        row["config_json"] = json.dumps(r["config"])
        row["summary_json"] = json.dumps(r["summary"])
        rows.append(row)
    cols = ["run VARCHAR", "run_dir VARCHAR"] + [f"{c} {t}" for c, (_, t) in _RUN_FIELDS.items()] + \
        ["finished BOOLEAN", "config_json VARCHAR", "summary_json VARCHAR"]
    names = [c.split()[0] for c in cols]
    values = ", ".join(
        "(" + ", ".join(f"TRY_CAST({_lit(row[k]) if row[k] is not None else 'NULL'} AS {c.split()[1]})"
                        for k, c in zip(names, cols)) + ")" for row in rows)
    if values:
        con.execute(f"CREATE VIEW runs AS SELECT * FROM (VALUES {values}) AS t({', '.join(names)})")
    else:
        con.execute("CREATE VIEW runs AS SELECT " + ", ".join(f"NULL::{c.split()[1]} AS {c.split()[0]}"
                                                              for c in cols) + " WHERE false")
    srcs = [("pairs", len(pairs)), ("rejected_rows", len(rejected)), ("steps", len(steps)),
            ("examples", len(examples)), ("runs", len(rows))]
    con.execute("CREATE VIEW view_sources AS SELECT * FROM (VALUES " +
                ", ".join(f"({_lit(v)}, {k})" for v, k in srcs) + ") AS t(view_name, n_sources)")
    attached = [("run", n, str(r["dir"])) for n, r in zip(run_names, run_info)] + \
        [("cache", n, str(c["dir"])) for n, c in zip(cache_names, cache_info)]
    con.execute("CREATE VIEW attached AS " + (
        "SELECT * FROM (VALUES " + ", ".join(f"({_lit(k)}, {_lit(n)}, {_lit(d)})" for k, n, d in attached) +
        ") AS t(kind, name, dir)" if attached else
        "SELECT NULL::VARCHAR AS kind, NULL::VARCHAR AS name, NULL::VARCHAR AS dir WHERE false"))

    con.execute(SHARED_SQL.read_text())

    # From here on the connection reads only these directories and cannot be reconfigured.
    dirs = [str(r["dir"]) + "/" for r in run_info] + [str(c["dir"]) + "/" for c in cache_info]
    dirs += [_escape_glob(d) for d in dirs if _escape_glob(d) != d]  # as the views name their files (_files)
    if dirs:
        con.execute(f"SET allowed_directories = [{', '.join(_lit(d) for d in dirs)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _caches_view(con, names, infos):
    """The `caches` view: what each attached cache's manifest says about how it was built."""
    rows = [(n, str(c["dir"]), c["manifest"]["schema_version"], (c["manifest"].get("backend") or {}).get("name"),
             (c["manifest"].get("backend") or {}).get("dtype"), c["manifest"]["dataset"]["rows_kept"],
             ches_missing_reason(c["manifest"])) for n, c in zip(names, infos)]
    names_types = [("cache", "VARCHAR"), ("dir", "VARCHAR"), ("schema_version", "INTEGER"), ("backend", "VARCHAR"),
                   ("dtype", "VARCHAR"), ("rows", "BIGINT"), ("ches_missing", "VARCHAR")]
    cells = ", ".join("(" + ", ".join(f"{'NULL' if v is None else _lit(v)}::{t}" for v, (_, t) in zip(r, names_types))
                      + ")" for r in rows)
    if cells:
        con.execute(f"CREATE VIEW caches AS SELECT * FROM (VALUES {cells}) AS t({', '.join(n for n, _ in names_types)})")
    else:
        con.execute("CREATE VIEW caches AS SELECT " + ", ".join(f"NULL::{t} AS {n}" for n, t in names_types) +
                    " WHERE false")


def view_sources(con) -> dict:
    """{view name: number of Parquet sources behind it} (0 = the view is empty)."""
    return dict(con.execute("SELECT view_name, n_sources FROM view_sources").fetchall())


def attached(con) -> list:
    """[(kind 'run'|'cache', name, absolute dir)] behind this connection's views."""
    return con.execute("SELECT kind, name, dir FROM attached").fetchall()


_READ_PRAGMAS = {"show_tables", "show_tables_expanded", "table_info", "show", "database_list", "version",
                 "storage_info", "functions", "collations", "platform", "metadata_info", "user_agent"}


def check_read_only(sql: str) -> list:
    """Split `sql` into statements; refuse anything that is not a read. Returns the statements."""
    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise UserError(one_line(e)) from None
    if not stmts:
        raise UserError("empty SQL: give one SELECT statement")
    if len(stmts) > 1:
        raise UserError(f"{len(stmts)} statements given: give exactly one read (SELECT/WITH/DESCRIBE/SHOW/EXPLAIN)")
    st = stmts[0]
    kind = st.type
    text = st.query.strip().rstrip(";")
    if kind == duckdb.StatementType.SELECT:
        return stmts
    if kind == duckdb.StatementType.EXPLAIN:  # EXPLAIN [ANALYZE] runs its inner statement: check that too
        inner = re.sub(r"^\s*explain\s+(analy[sz]e\s+)?", "", text, flags=re.IGNORECASE)
        if inner != text:
            check_read_only(inner)
            return stmts
    if kind == duckdb.StatementType.PRAGMA:
        m = re.match(r"\s*pragma\s+(\w+)", text, flags=re.IGNORECASE)
        if m and m.group(1).lower() in _READ_PRAGMAS:
            return stmts
    word = text.split()[0].upper() if text.split() else "?"
    raise UserError(f"{word} refused: queries are read-only (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN, "
                    "PRAGMA show_tables/table_info); nothing may change a cache or run")


def one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:3]) if lines else type(e).__name__
