"""The input's own columns: which ones the cache keeps, under what name and with what type.

Every input column that is not mapped to prompt/chosen/rejected and holds scalars (numbers, strings, booleans,
nulls) is kept in the cache after the contract's columns (an id, a score, a category, a source...). Every part
of a cache has the same schema, so the types are decided before the first part is written, from the whole
input (up to --limit):

  Parquet / saved datasets   the file's own Arrow schema (footers only, no rows read): integers -> int64,
                             floats -> float64, bool -> bool, strings (also dictionary-encoded) -> string;
                             types with no exact int64/float64 equivalent (uint64, decimal, date, time,
                             timestamp, duration) -> string, their text; lists, structs, maps, binary: skipped
  JSON / JSONL               one pre-scan pass over the rows (`scan`): the kinds of the values a column holds
  CSV                        one pre-scan pass over the cells: "true"/"false" (any case) are booleans,
                             -?(0|[1-9][0-9]*) fitting int64 are integers, the same with a fraction and/or
                             exponent are floats ("007", "1.", ".5", "nan" stay text), an empty cell is null
                             in a number or boolean column and "" in a text column

Kinds combine into one type per column: only integers -> int64; integers and floats -> float64; only booleans
-> bool; only strings -> string; any other mix (booleans and numbers, numbers and strings, integers beyond
int64) -> string, each value as its JSON text (true, 3, 0.5); only nulls -> string (all null). A column that
holds a list or an object in any row is skipped and listed once (manifest `skipped_columns`, the precompute
summary). A column missing from a row or a file is null there. Across the files of a directory the same rule
combines the files' kinds.

Names: the input's name, unless it equals (case-insensitively, as DuckDB compares identifiers) a cache column,
a column the `pairs` view adds (refcache_base.cache_schema.RESERVED_NAMES) or another input column that kept its name
("Category" beside "category"); then EXTRA_PREFIX + name ("input_pair_id"), repeated until the name is free.
"""

import json
import numbers
import re
import time
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.data import _READERS, Reject, Source, _load_dataset, file_format, open_parquet
from refcache_base.cache_schema import EXTRA_PREFIX, EXTRA_TYPES, RESERVED_NAMES

# value kinds
NULL, BOOL, INT, FLOAT, STRING, TEXT, NESTED, BINARY = "null", "bool", "int", "float", "string", "text", \
    "nested", "binary"
SKIP_REASONS = {NESTED: "lists or objects", BINARY: "binary values"}
INT64 = (-(2 ** 63), 2 ** 63)
CSV_INT = re.compile(r"-?(0|[1-9][0-9]*)")
CSV_FLOAT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def value_kind(v) -> str:
    """Kind of one JSON (or Arrow-decoded) value."""
    if v is None:
        return NULL
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, int):
        return INT if INT64[0] <= v < INT64[1] else TEXT
    if isinstance(v, float):
        return FLOAT
    if isinstance(v, str):
        return STRING
    if isinstance(v, (bytes, bytearray)):
        return BINARY
    if isinstance(v, (list, tuple, dict)):
        return NESTED
    return TEXT


def cell_kind(v) -> str:
    """Kind of one CSV cell (a string, or a list when the cell held JSON messages)."""
    if not isinstance(v, str):
        return value_kind(v)
    if v == "":
        return NULL
    if v.lower() in ("true", "false"):
        return BOOL
    if CSV_INT.fullmatch(v):
        return INT if INT64[0] <= int(v) < INT64[1] else TEXT
    if CSV_FLOAT.fullmatch(v):
        return FLOAT
    return STRING


def arrow_kind(t: pa.DataType) -> str:
    """Kind of an Arrow column type (Parquet files, saved datasets)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return NULL
    if pa.types.is_boolean(t):
        return BOOL
    if pa.types.is_integer(t):
        return TEXT if t == pa.uint64() else INT
    if pa.types.is_floating(t):
        return FLOAT
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return STRING
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
            or pa.types.is_binary_view(t):
        return BINARY
    if pa.types.is_nested(t):
        return NESTED
    return TEXT  # decimal, date, time, timestamp, duration, interval


def column_type(kinds: set) -> str | None:
    """The cache type for a column whose values had these kinds; None when the column is skipped."""
    if kinds & set(SKIP_REASONS):
        return None
    kinds = kinds - {NULL}
    if kinds == {INT}:
        return "int64"
    if kinds and kinds <= {INT, FLOAT}:
        return "float64"
    if kinds == {BOOL}:
        return "bool"
    return "string"  # strings, a mix, or only nulls


def as_text(v) -> str:
    """A non-string value of a string column: JSON's spelling for JSON scalars (true, 3, 0.5), str() else."""
    if isinstance(v, (bool, int, float)):
        return json.dumps(v)
    return str(v)


@dataclass
class ExtraColumns:
    """The input columns a cache keeps: [{"name" (in the cache), "source" (in the input), "type"}], in input
    order, and {input name: why skipped}."""

    columns: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)

    def values(self, rec: dict) -> dict:
        """{cache name: value converted to the column's type} for one input record; Reject when a value does
        not fit the type the scan found (the input changed while it was read)."""
        out = {}
        for c in self.columns:
            try:
                out[c["name"]] = convert(rec.get(c["source"]), c["type"])
            except (ValueError, TypeError, KeyError):
                raise Reject("column_type", f"column {c['source']!r}: {rec.get(c['source'])!r} is not a {c['type']} "
                             "value as the scan of the input found; was the input changed while precompute read "
                             "it?") from None
        return out

    def fields(self) -> list:
        return [pa.field(c["name"], EXTRA_TYPES[c["type"]]) for c in self.columns]


def convert(v, typ: str):
    """One value as `typ` (int64, float64, bool, string); ValueError when it does not fit. CSV cells arrive
    as strings and are parsed by the rule the scan used."""
    if v is None:
        return None
    if typ == "string":
        return v if isinstance(v, str) else as_text(v)
    if isinstance(v, str):  # a CSV cell in a number or boolean column
        kind = cell_kind(v)
        if kind == NULL:
            return None
        v = {"true": True, "false": False}[v.lower()] if kind == BOOL else int(v) if kind == INT else float(v)
    if typ == "bool":
        ok = isinstance(v, bool)
    elif typ == "int64":
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and INT64[0] <= v < INT64[1]
    else:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool)  # float16 arrives as a numpy scalar
    if not ok:
        raise ValueError(v)
    return v if typ == "bool" else int(v) if typ == "int64" else float(v)


def cache_names(names: list) -> dict:
    """{input name: name in the cache}. Every name that is free keeps it; a name equal (case-insensitively) to
    a reserved one or to another kept name gets EXTRA_PREFIX until it is free."""
    taken, out = set(RESERVED_NAMES), {}
    for n in names:
        if n.lower() not in taken:
            out[n] = n
            taken.add(n.lower())
    for n in names:
        if n not in out:
            m = n
            while m.lower() in taken:
                m = EXTRA_PREFIX + m
            out[n] = m
            taken.add(m.lower())
    return out


def scan(src: Source, limit=None, progress=False) -> tuple[ExtraColumns, float]:
    """The extra columns of `src` (rows with index < limit) and the seconds the scan took. For JSON, JSONL and
    CSV it reads every row once (on the 2,403-row embedded train.jsonl: ~25 ms, less than half the time of
    reading and normalizing it once; scoring takes minutes)."""
    t0 = time.perf_counter()
    bar = None
    if progress and src.kind != "datasets" and any(file_format(f) != "parquet" for f in src.files):
        from refcache_base.progress import Progress

        total = src.approx_rows()
        bar = Progress(min(total, limit) if total and limit else total, "row", "scan columns", transient=True)
    mapped = set(src.columns.values())
    kinds: dict[str, set] = {}  # input name -> kinds seen, in first-seen order

    def add(name, kind):
        if name not in mapped:
            kinds.setdefault(name, set()).add(kind)

    if src.kind == "datasets":
        for f in _load_dataset(src.path).data.schema:
            add(f.name, arrow_kind(f.type))
    else:
        index = 0
        for f in src.files:
            if limit is not None and index >= limit:
                break
            fmt = file_format(f)
            if fmt == "parquet":
                pf = open_parquet(f)
                for fld in pf.schema_arrow:
                    add(fld.name, arrow_kind(fld.type))
                index += pf.metadata.num_rows
                continue
            kind_of = cell_kind if fmt == "csv" else value_kind
            for rec, _error in _READERS[fmt](f):
                if limit is not None and index >= limit:
                    break
                index += 1
                for k, v in (rec or {}).items():  # an unreadable row has no columns
                    add(k, kind_of(v))
                if bar is not None and index % 4096 == 0:
                    bar.update(4096)
    if bar is not None:
        bar.close()
    extras = ExtraColumns()
    kept = {}
    for name, ks in kinds.items():
        typ = column_type(ks)
        if not isinstance(name, str) or not name:
            extras.skipped[str(name)] = "no column name"
        elif typ is None:
            extras.skipped[name] = next(SKIP_REASONS[k] for k in (NESTED, BINARY) if k in ks)
        else:
            kept[name] = typ
    names = cache_names(list(kept))
    extras.columns = [{"name": names[n], "source": n, "type": typ} for n, typ in kept.items()]
    return extras, time.perf_counter() - t0

