"""The stage-1 cache schema (../shared/design.md, "Stage 1 cache"). One row = one preference pair.

Stage 2 and stage 3 read these names; change them only together with the contract.

Schema versions (manifest `schema_version`, and each part's metadata):
  1  the columns below up to `truncated`; rejected_rows.parquet and the bookkeeping files at the top level
  2  adds `ches` and `ln_ches`, the input's own scalar columns after them (`extra_columns` in the manifest),
     and moves rejected_rows.parquet and the bookkeeping files into CACHE/__refcache__/ (pipeline/cache.py)
Readers take both: a version-1 part reads as if `ches` and `ln_ches` were null.

rejected_rows.parquet gained `reason_kind` (pipeline/reject.py's KINDS) without a version change: a file written
before has only source_index, source_file and reason (REJECTED_REQUIRED); readers give it a null reason_kind.
"""

import pyarrow as pa

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

CACHE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),  # stable hash of (prompt, chosen, rejected) as given
        ("source_index", pa.int64()),  # row number in the input
        ("prompt_ids", pa.list_(pa.int32())),  # exact tokens scored
        ("chosen_ids", pa.list_(pa.int32())),  # completion tokens, EOS included
        ("rejected_ids", pa.list_(pa.int32())),
        ("ref_chosen_token_logps", pa.list_(pa.float32())),  # log p_ref per completion token
        ("ref_rejected_token_logps", pa.list_(pa.float32())),
        ("ref_chosen_logp", pa.float64()),  # sums of the above
        ("ref_rejected_logp", pa.float64()),
        ("prompt_len", pa.int32()),  # token counts after truncation
        ("chosen_len", pa.int32()),
        ("rejected_len", pa.int32()),
        ("shared_prefix_len", pa.int32()),  # leading completion tokens chosen and rejected share
        ("truncated", pa.bool_()),
        # CHES displacement score (Razin et al. 2024, arXiv 2410.08847) from the reference model's last-layer
        # hidden states h over each completion's tokens: ches = <sum h+, sum h-> - ||sum h+||^2, ln_ches the
        # same with means instead of sums. Null when the backend did not compute it. (Schema 2.)
        ("ches", pa.float64()),
        ("ln_ches", pa.float64()),
    ]
)

V2_COLUMNS = ("ches", "ln_ches")  # the columns schema version 2 added

# The manifest's `backend.settings.ches`: whether the backend filled `ches`/`ln_ches` (pipeline/ches.py computes them).
CHES_COMPUTED = "computed"
CHES_SKIPPED = "not computed (--no-ches)"  # the run was told to skip it
CHES_NO_LAYOUT = "not computed (no shared-prompt layout for this model)"  # hf on a model it cannot pack


def ches_missing_reason(manifest: dict):
    """None when this cache has CHES; else one line saying why not and what to do (for the diagnostics that
    need it, the `caches` view and the precompute summary)."""
    backend = manifest.get("backend") or {}
    settings = backend.get("settings") or {}
    name = backend.get("name", "unknown")
    fix = "rebuild with --backend hf"
    if settings.get("ches") == CHES_COMPUTED:
        return None
    if manifest.get("schema_version", 1) == 1:
        why = "built before refcache computed CHES (cache schema 1)"
    elif settings.get("ches") == CHES_SKIPPED:
        why, fix = f"built with the {name} backend and --no-ches", "rebuild without --no-ches"
    elif settings.get("ches") == CHES_NO_LAYOUT:
        why, fix = "built with the hf backend, which packs no pair of this model", "rebuild with --backend vllm"
    elif (name == "hf" and "ches" not in settings) or (name == "vllm" and "ches_method" not in settings):
        why, fix = f"built with the {name} backend before refcache computed CHES with it", "rebuild it"
    else:
        why = f"built with the {name} backend"
    return f"no CHES in this cache: {why}; {fix}"


def contract_schema(version: int) -> pa.Schema:
    """The contract's columns in a cache of this schema version (without the input's own columns)."""
    if version == 1:
        return pa.schema([f for f in CACHE_SCHEMA if f.name not in V2_COLUMNS])
    return CACHE_SCHEMA


# Columns the `pairs` view adds to each cache's columns (queries/db.py). An input column with one of these
# names, or a cache column's name, is kept as EXTRA_PREFIX + its name (compared case-insensitively, as DuckDB
# compares identifiers).
PAIRS_VIEW_COLUMNS = ("cache", "length_diff")
EXTRA_PREFIX = "input_"
RESERVED_NAMES = frozenset(n.lower() for n in (*CACHE_SCHEMA.names, *PAIRS_VIEW_COLUMNS))

# Types an input's own column can have in the cache (manifest `extra_columns[].type`), see pipeline/columns.py.
EXTRA_TYPES = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}


def part_schema(extra_columns=()) -> pa.Schema:
    """The schema of every part of a cache: the contract's columns, then the input's own columns in order.
    `extra_columns` holds {"name", "type"} records (the manifest's `extra_columns`)."""
    return pa.schema([*CACHE_SCHEMA, *(pa.field(c["name"], EXTRA_TYPES[c["type"]]) for c in extra_columns)])


REJECTED_SCHEMA = pa.schema(
    [
        ("source_index", pa.int64()),
        ("source_file", pa.string()),
        ("reason_kind", pa.string()),  # one short stable name per cause (pipeline/reject.py), for GROUP BY
        ("reason", pa.string()),  # the readable reason, with the row's own details
    ]
)
REJECTED_REQUIRED = ("source_index", "source_file", "reason")  # what every rejected_rows.parquet has
