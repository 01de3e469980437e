"""The stage-1 cache directory: part files, shard manifests, merge, and readers for stages 2 and 3.

    CACHE/part-00000.parquet      chunk k of the input (rows k*part_size ..), zstd, written atomically;
                                  key-value metadata b"refcache": the cache identity + this part's row
                                  counts and rejected rows (so each part is a self-contained unit of work)
    CACHE/_shard-I-of-N.json      written by each finished shard: settings fingerprint, total rows read
    CACHE/manifest.json           written by merge once every part is present and valid
    CACHE/rejected_rows.parquet   source_index, source_file, reason (merged from the parts)

Readers: `read_manifest(cache_dir)`, `load_table(cache_dir, columns=None)`.
"""

import glob
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import refcache
from pipeline.fingerprint import file_sha256
from pipeline.schema import CACHE_SCHEMA, REJECTED_SCHEMA, SCHEMA_VERSION
from refcache import UserError

META_KEY = b"refcache"


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def shard_name(i: int, n: int) -> str:
    return f"_shard-{i}-of-{n}.json"


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def atomic_write(path: Path, write):
    """write(tmp_path), fsync, then rename over `path`: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


# ---------------------------------------------------------------- parts


def _list_array(arrays, value_type):
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dt = value_type.to_pandas_dtype()
    values = np.concatenate(arrays).astype(dt) if arrays else np.zeros(0, dtype=dt)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def part_table(tokenized, chosen_logps, rejected_logps) -> pa.Table:
    """Rows of one part (tokenized pairs in source order, with their per-token log-probs)."""
    i32 = pa.int32()
    cl = [np.asarray(a, dtype=np.float32) for a in chosen_logps]
    rl = [np.asarray(a, dtype=np.float32) for a in rejected_logps]
    cols = {
        "pair_id": pa.array([t.pair.pair_id for t in tokenized], pa.string()),
        "source_index": pa.array([t.pair.index for t in tokenized], pa.int64()),
        "prompt_ids": _list_array([np.asarray(t.prompt_ids) for t in tokenized], i32),
        "chosen_ids": _list_array([np.asarray(t.chosen_ids) for t in tokenized], i32),
        "rejected_ids": _list_array([np.asarray(t.rejected_ids) for t in tokenized], i32),
        "ref_chosen_token_logps": _list_array(cl, pa.float32()),
        "ref_rejected_token_logps": _list_array(rl, pa.float32()),
        "ref_chosen_logp": pa.array([float(a.astype(np.float64).sum()) for a in cl], pa.float64()),
        "ref_rejected_logp": pa.array([float(a.astype(np.float64).sum()) for a in rl], pa.float64()),
        "prompt_len": pa.array([len(t.prompt_ids) for t in tokenized], i32),
        "chosen_len": pa.array([len(t.chosen_ids) for t in tokenized], i32),
        "rejected_len": pa.array([len(t.rejected_ids) for t in tokenized], i32),
        "shared_prefix_len": pa.array([t.shared_prefix_len for t in tokenized], i32),
        "truncated": pa.array([t.truncated for t in tokenized], pa.bool_()),
    }
    return pa.Table.from_pydict(cols, schema=CACHE_SCHEMA)


def write_part(cache_dir: Path, k: int, table: pa.Table, meta: dict):
    """Write part k atomically with the identity + part info in its key-value metadata."""
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    atomic_write(Path(cache_dir) / part_name(k),
                 lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def part_meta(path: Path) -> dict | None:
    """The part's metadata if the file is a complete, readable part whose row count matches; else None."""
    try:
        pf = pq.ParquetFile(path)
        meta = json.loads(pf.schema_arrow.metadata[META_KEY])
        if pf.metadata.num_rows != meta["part"]["rows_kept"]:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or not ours: recompute it
        return None


def settings_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def _inner_diff(old: dict, new: dict) -> str:
    """What changed inside the differing settings that are dicts, e.g. "tokenization.max_length 1023 -> 600"."""
    def show(d, k):
        r = repr(d[k]) if k in d else "(absent)"
        return r if len(r) <= 48 else r[:45] + "..."

    out = [f"{k}.{sub} {show(old[k], sub)} -> {show(new[k], sub)}" for k in settings_diff(old, new)
           if isinstance(old.get(k), dict) and isinstance(new.get(k), dict) for sub in settings_diff(old[k], new[k])]
    return "; " + ", ".join(out) if out else ""


def check_compatible(cache_dir: Path, fingerprint: str, settings: dict):
    """Refuse to add to a cache made with other settings (checks manifest, shard manifests, parts)."""
    cache_dir = Path(cache_dir)
    found = []
    for f in [cache_dir / "manifest.json", *sorted(cache_dir.glob("_shard-*.json"))]:
        m = _read_json(f)
        if m is not None:
            found.append((f.name, m.get("fingerprint"), m.get("settings", {})))
    for f in sorted(cache_dir.glob("part-*.parquet"))[:1]:
        m = part_meta(f)
        if m:
            found.append((f.name, m.get("fingerprint"), m.get("settings", {})))
    for name, fp, old in found:
        if fp != fingerprint:
            diff = ", ".join(settings_diff(old, settings)) or "unknown"
            raise UserError(f"{cache_dir}/{name} was made with different settings ({diff} differ"
                            f"{_inner_diff(old, settings)}); "
                            "use a new --out directory or delete this one")


def _read_json(path: Path):
    """A JSON object from `path`, or None when missing or unreadable (it will be rewritten)."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def done_parts(cache_dir: Path, fingerprint: str) -> dict[int, dict]:
    """{k: metadata} of parts that are complete and belong to this fingerprint."""
    out = {}
    for f in Path(cache_dir).glob("part-*.parquet"):
        meta = part_meta(f)
        if meta and meta.get("fingerprint") == fingerprint:
            out[meta["part"]["index"]] = meta
    return out


# ---------------------------------------------------------------- merge


def merge(cache_dir) -> dict:
    """Validate every part against the shard manifests; write rejected_rows.parquet and manifest.json."""
    cache_dir = Path(cache_dir)
    shards = []
    for f in sorted(cache_dir.glob("_shard-*.json")):
        m = _read_json(f)
        if m is None:
            raise UserError(f"{f}: unreadable shard manifest; re-run that shard")
        shards.append(m)
    if not shards:
        raise UserError(f"{cache_dir}: no finished shard (no _shard-*.json); run precompute first")
    fps = {s["fingerprint"] for s in shards}
    if len(fps) > 1:
        raise UserError(f"{cache_dir}: shard manifests disagree on settings; the shards were run differently")
    first = shards[0]
    num_chunks, rows_read = first["num_chunks"], first["rows_read"]
    if any(s["num_chunks"] != num_chunks or s["rows_read"] != rows_read for s in shards):
        raise UserError(f"{cache_dir}: shard manifests disagree on the input's size; was the input changed?")

    metas, missing = [], []
    for k in range(num_chunks):
        m = part_meta(cache_dir / part_name(k))
        if m is None or m["fingerprint"] != first["fingerprint"]:
            missing.append(k)
        else:
            metas.append(m)
    if missing:
        n = shards[0]["shard"]["count"]
        which = sorted({k % n for k in missing})
        raise UserError(f"{cache_dir}: {len(missing)} of {num_chunks} parts missing or invalid "
                        f"(first: {part_name(missing[0])}); re-run shard(s) "
                        f"{', '.join(f'{i}/{n}' for i in which)} to complete them")

    rejected = sorted((tuple(r) for m in metas for r in m["part"]["rejected"]), key=lambda r: r[0])
    kept = sum(m["part"]["rows_kept"] for m in metas)
    read = sum(m["part"]["rows_read"] for m in metas)
    if read != rows_read or kept + len(rejected) != read:
        raise UserError(f"{cache_dir}: row counts do not add up (read {read} of {rows_read}, kept {kept}, "
                        f"rejected {len(rejected)}); delete the cache and re-run")
    rej = pa.table({"source_index": pa.array([r[0] for r in rejected], pa.int64()),
                    "source_file": pa.array([r[1] for r in rejected], pa.string()),
                    "reason": pa.array([r[2] for r in rejected], pa.string())}, schema=REJECTED_SCHEMA)
    atomic_write(cache_dir / "rejected_rows.parquet", lambda tmp: pq.write_table(rej, tmp, compression="zstd"))

    scored = [m for m in metas if "version" in m["identity"]["backend"]]  # parts that loaded the backend
    ident = (scored or metas or [first])[0]["identity"]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "refcache_version": refcache.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": first["fingerprint"],
        "model": ident["model"],
        "tokenizer": ident["tokenizer"],
        "tokenization": ident["tokenization"],
        "backend": ident["backend"],
        "dataset": {**ident["dataset"], "rows_read": read, "rows_kept": kept, "rows_rejected": len(rejected)},
        "shards": [{"file": part_name(k), "rows": m["part"]["rows_kept"],
                    "sha256": file_sha256(cache_dir / part_name(k))} for k, m in enumerate(metas)],
        "rejected_rows": {"file": "rejected_rows.parquet", "rows": len(rejected)},
        "tokens": {"chosen": sum(m["part"]["chosen_tokens"] for m in metas),
                   "rejected": sum(m["part"]["rejected_tokens"] for m in metas),
                   "prompt": sum(m["part"]["prompt_tokens"] for m in metas)},
        "settings": first["settings"],
    }
    old = cache_dir / "manifest.json"
    if old.exists():  # re-running a finished cache: keep its manifest (and its sha256) unless something changed
        previous = json.loads(old.read_text())
        if {k: v for k, v in previous.items() if k != "created"} == {k: v for k, v in manifest.items() if k != "created"}:
            return previous
    write_json(cache_dir / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------- readers


def read_manifest(cache_dir) -> dict:
    path = Path(cache_dir) / "manifest.json"
    if not path.exists():
        hint = " (parts exist: finish the shards or run `refcache merge`)" if glob.glob(
            str(Path(cache_dir) / "part-*.parquet")) else ""
        raise UserError(f"{cache_dir}: not a finished refcache cache (no manifest.json){hint}")
    m = _read_json(path)
    if m is None:
        raise UserError(f"{path}: unreadable manifest; re-run precompute or `refcache merge`")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{path}: cache schema_version {m.get('schema_version')}, this refcache reads "
                        f"{SCHEMA_VERSION}; re-run precompute")
    return m


def load_table(cache_dir, columns=None) -> pa.Table:
    """All parts listed in the manifest as one table, ordered by source_index."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    want = None if columns is None else list(dict.fromkeys([*columns, "source_index"]))
    tables = []
    for s in m["shards"]:
        try:
            tables.append(pq.read_table(cache_dir / s["file"], columns=want))
        except (OSError, ValueError) as e:
            raise UserError(f"{cache_dir / s['file']}: unreadable part ({e}); re-run precompute") from None
    schema = CACHE_SCHEMA if want is None else pa.schema([CACHE_SCHEMA.field(c) for c in want])
    t = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]) if tables else schema.empty_table()
    t = t.sort_by("source_index")
    if columns is not None and "source_index" not in columns:
        t = t.drop(["source_index"])
    return t
