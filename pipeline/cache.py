"""The stage-1 cache directory: part files, shard manifests, merge, and the one reader stages 2 and 3 use.

    CACHE/part-00000.parquet      chunk k of the input (rows k*part_size ..), zstd, written atomically;
                                  key-value metadata b"refcache": the cache identity + this part's row
                                  counts and rejected rows (so each part is a self-contained unit of work).
                                  Every part has the same schema (refcache_base.cache_schema.part_schema)
    CACHE/__refcache__/           refcache's own files, out of the parts' glob (SIDE):
      manifest.json               written by merge once every part is present and valid: the cache's identity
                                  and the part list with each part's bytes and sha256
      rejected_rows.parquet       source_index, source_file, reason_kind, reason (merged from the parts;
                                  pipeline/reject.py; reason_kind is null, or absent in a file written
                                  before it, for rows of parts written before kinds)
      _written-I-of-N.jsonl       shard I/N's log: {file, bytes, sha256} of each part, appended before the part
                                  is renamed into place (a resumed run reuses a part only if its sha256 is on
                                  record, so a part damaged after it was written is recomputed, never blessed);
                                  _written-ray-PID-TAG.jsonl: the same, one per Ray actor process (--ray)
      _shard-I-of-N.json          written by each finished shard: settings fingerprint, total rows read
      _sums.json                  memo for readers: each part's sha256 with the file's size, inode, mtime and
                                  ctime when it was hashed (see `check_parts`)
    CACHE/.refcache-lock-*        held while a shard (one lock per shard) or merge writes (refcache_base.lock)

So the directory holds the parts and nothing else a Parquet reader would open: `CACHE/*.parquet` (Polars,
DuckDB) and the directory itself (`datasets.load_dataset("parquet", data_dir=CACHE)`, pyarrow.dataset) are exactly
the kept pairs. A schema-version-1 cache keeps the files of __refcache__/ at the top level; readers and merge look
there too (`side_dir`, `_side_files`, `manifest_path`).

Readers: `manifest_path(cache_dir)`, `read_manifest(cache_dir)`, `check_parts(cache_dir)` (the manifest's part files, each checked before
use), `load_table(cache_dir, columns=None)`, `rejected_path(cache_dir, manifest)`. Training, verify and the
DuckDB views all read through these.
"""

import hashlib
import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import reject
from pipeline.fingerprint import file_sha256
from refcache_base import SettingsChanged, UserError, __version__
from refcache_base.cache_schema import (
    READABLE_VERSIONS,
    REJECTED_SCHEMA,
    SCHEMA_VERSION,
    V2_COLUMNS,
    part_schema,
)
from refcache_base.files import atomic_write, with_filename, write_json
from refcache_base.lock import DirLock

META_KEY = b"refcache"
PART_RE = re.compile(r"part-\d{5,}\.parquet")
SIDE = "__refcache__"  # a "__" folder: `datasets` skips it, as pyarrow.dataset and Spark skip "_" names
MANIFEST = "manifest.json"
SUMS_MEMO = "_sums.json"
REJECTED_FILE = "rejected_rows.parquet"
# A memo entry is trusted only for a file whose ctime is this much older than the entry: a change in the same
# clock tick as the hashing (file timestamps are coarse, up to 2 s on some filesystems) could keep every stat
# field; so a part written just before its sum was taken is hashed again on every read.
RACY_NS = 2_000_000_000


def part_name(k: int) -> str:
    return f"part-{k:05d}.parquet"


def side_dir(cache_dir, version=SCHEMA_VERSION) -> Path:
    """Where a cache of this schema version keeps rejected rows and bookkeeping (version 1: the top level)."""
    return Path(cache_dir) / SIDE if version != 1 else Path(cache_dir)


def manifest_path(cache_dir) -> Path:
    """CACHE/__refcache__/manifest.json, or a version-1 cache's CACHE/manifest.json (where a new one is absent)."""
    d = Path(cache_dir)
    new = d / SIDE / MANIFEST
    return d / MANIFEST if not new.exists() and (d / MANIFEST).exists() else new


def is_cache(path) -> bool:
    """True when `path` holds a finished cache's manifest (any readable schema version)."""
    return manifest_path(path).is_file()


def shard_name(i: int, n: int) -> str:
    """Shard I/N's manifest, relative to the cache directory."""
    return f"{SIDE}/_shard-{i}-of-{n}.json"


def written_log(i: int, n: int) -> str:
    """Shard I/N's write log, relative to the cache directory."""
    return f"{SIDE}/_written-{i}-of-{n}.jsonl"


def ray_written_log(writer_id: str) -> str:
    """The write log of one Ray actor process (pipeline/distributed.py; `writer_id`: its pid and a random tag):
    each has its own, whatever node it runs on, so no two processes append to one file; readers take every
    _written-*.jsonl."""
    return f"{SIDE}/_written-ray-{writer_id}.jsonl"


def _side_files(cache_dir: Path, pattern: str) -> list[Path]:
    """Bookkeeping files matching `pattern`: in __refcache__/, and at the top level (version-1 caches)."""
    return sorted(Path(cache_dir).glob(pattern)) + sorted((Path(cache_dir) / SIDE).glob(pattern))


def rejected_path(cache_dir, manifest: dict) -> Path:
    """The cache's rejected_rows.parquet (top level in a version-1 cache)."""
    return side_dir(cache_dir, manifest.get("schema_version")) / REJECTED_FILE


def remove_temp_files(cache_dir):
    """Temp files a killed writer left (atomic_write names them .NAME.PID.tmp, next to their target)."""
    for tmp in [*Path(cache_dir).glob(".*.tmp"), *(Path(cache_dir) / SIDE).glob(".*.tmp")]:
        tmp.unlink(missing_ok=True)


# What refcache itself puts at the top of a cache directory (besides its own parts); a version-1 cache keeps
# its bookkeeping there too.
_OWN_NAME = re.compile(r"__refcache__|\.refcache-lock.*|\..+\.tmp")
_V1_NAME = re.compile(r"manifest\.json|rejected_rows\.parquet|_sums\.json|_written-\d+-of-\d+\.jsonl|"
                      r"_shard-\d+-of-\d+\.json")


def check_out_dir(out, data=None):
    """Refuse an --out that precompute must not write into: a file, a folder holding anything refcache did not
    write there (a user's own part-00000.parquet is not overwritten), or a folder that holds the input or lies
    inside an input folder (the next read would take the cache's parts for input). New, empty, or one of our
    caches (finished, partial or interrupted) is fine."""
    out = Path(out)
    if data is not None:
        src, dst = Path(data).resolve(), out.resolve()
        if src == dst or src.is_relative_to(dst) or (src.is_dir() and dst.is_relative_to(src)):
            raise UserError(f"--out {out} {'is' if src == dst else 'holds' if src.is_relative_to(dst) else 'is inside'} "
                            f"the input {data}; write the cache to a directory of its own")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose a new --out")
    v1 = (read_json(out / MANIFEST) or {}).get("schema_version") == 1 or \
        any("fingerprint" in (read_json(f) or {}) for f in out.glob("_shard-*-of-*.json"))
    recorded = None
    for f in sorted(out.iterdir()):
        ours = _OWN_NAME.fullmatch(f.name) or (v1 and _V1_NAME.fullmatch(f.name))
        if not ours and PART_RE.fullmatch(f.name) and f.is_file():  # ours: our metadata, or on our record
            recorded = recorded_sums(out) if recorded is None else recorded
            ours = f.name in recorded or part_meta(f) is not None
        if not ours:
            raise UserError(f"--out {out} holds files refcache did not write (e.g. {f.name}); precompute writes only "
                            "into a new or empty directory or one of its own caches: choose a new --out")


def settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- parts


def _list_array(arrays, value_type):
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dt = value_type.to_pandas_dtype()
    values = np.concatenate(arrays).astype(dt) if arrays else np.zeros(0, dtype=dt)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def part_table(tokenized, chosen_logps, rejected_logps, extra_columns=(), ches=None, ln_ches=None) -> pa.Table:
    """Rows of one part (tokenized pairs in source order, with their per-token log-probs). `extra_columns` are
    the manifest's records of the input columns kept (each pair's values in `t.pair.extra`); `ches` and
    `ln_ches` one float per pair, or None where the backend did not compute them (null)."""
    i32 = pa.int32()
    cl = [np.asarray(a, dtype=np.float32) for a in chosen_logps]
    rl = [np.asarray(a, dtype=np.float32) for a in rejected_logps]
    n = len(tokenized)
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
        "ches": pa.array([None] * n if ches is None else ches, pa.float64()),
        "ln_ches": pa.array([None] * n if ln_ches is None else ln_ches, pa.float64()),
    }
    schema = part_schema(extra_columns)
    for c in extra_columns:
        cols[c["name"]] = pa.array([t.pair.extra.get(c["name"]) for t in tokenized], schema.field(c["name"]).type)
    return pa.Table.from_pydict(cols, schema=schema)


def write_part(cache_dir: Path, k: int, table: pa.Table, meta: dict, log: str):
    """Write part k atomically with the identity + part info in its key-value metadata; its bytes and sha256
    go to the writer's `log` before the rename, so every part under its final name has its sum on record."""
    cache_dir = Path(cache_dir)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    atomic_write(cache_dir / part_name(k), lambda tmp: pq.write_table(table, tmp, compression="zstd"),
                 before_rename=lambda tmp: _append_line(cache_dir / log, {
                     "file": part_name(k), "bytes": os.path.getsize(tmp), "sha256": file_sha256(tmp)}))


def _append_line(path: Path, record: dict):
    """Append one JSON line, durably; after a line cut off by a kill, on a line of its own."""
    try:
        path.parent.mkdir(exist_ok=True)
        with open(path, "a+b") as fh:
            cut = fh.seek(0, os.SEEK_END) > 0 and fh.seek(-1, os.SEEK_END) >= 0 and fh.read(1) != b"\n"
            fh.write((b"\n" if cut else b"") + json.dumps(record).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise with_filename(e, path) from None


def recorded_sums(cache_dir: Path) -> dict[str, set]:
    """{part file: the sha256s refcache wrote it with}: from the writers' logs; for a part no log mentions (a
    cache built before the logs, or copied without them), the manifest's sha256."""
    cache_dir = Path(cache_dir)
    out = defaultdict(set)
    for log in _side_files(cache_dir, "_written-*.jsonl"):
        try:
            lines = log.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                r = json.loads(line)
                out[r["file"]].add(r["sha256"])
            except (ValueError, KeyError, TypeError):  # a line cut off by a kill
                continue
    for s in (read_json(manifest_path(cache_dir)) or {}).get("shards", []):
        if isinstance(s, dict) and s.get("sha256") and s.get("file") not in out:
            out[s.get("file")] = {s["sha256"]}
    return out


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
    """What changed: inside the differing settings that are dicts, e.g. "tokenization.max_length 1023 -> 600", and
    the others but hashes, e.g. "limit 4 -> None"."""
    def show(d, k):
        r = repr(d[k]) if k in d else "(absent)"
        return r if len(r) <= 48 else r[:45] + "..."

    out = []
    for k in settings_diff(old, new):
        if isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            out += [f"{k}.{sub} {show(old[k], sub)} -> {show(new[k], sub)}"
                    for sub in settings_diff(old[k], new[k])]
        elif not k.endswith("sha256"):
            out.append(f"{k} {show(old, k)} -> {show(new, k)}")
    return "; " + ", ".join(out) if out else ""


def check_compatible(cache_dir: Path, fingerprint: str, settings: dict):
    """Refuse to add to a cache made with other settings (checks manifest, shard manifests, parts)."""
    cache_dir = Path(cache_dir)
    found = []
    for f in [manifest_path(cache_dir), *_side_files(cache_dir, "_shard-*.json")]:
        m = read_json(f)
        if m is not None:
            found.append((f.relative_to(cache_dir), m.get("fingerprint"), m.get("settings", {})))
    for f in sorted(cache_dir.glob("part-*.parquet"))[:1]:
        m = part_meta(f)
        if m:
            found.append((f.name, m.get("fingerprint"), m.get("settings", {})))
    for name, fp, old in found:
        if fp != fingerprint:
            diff = ", ".join(settings_diff(old, settings)) or "unknown"
            raise SettingsChanged(f"{cache_dir}/{name} was made with different settings ({diff} differ"
                            f"{_inner_diff(old, settings)}); "
                            "use a new --out directory or delete this one")


def read_json(path: Path):
    """A JSON object from `path`, or None when missing or unreadable (it will be rewritten)."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def done_parts(cache_dir: Path, fingerprint: str, shard=(0, 1)) -> tuple[dict[int, dict], list[Path]]:
    """({k: metadata} of this shard's parts that are complete, belong to this fingerprint and hash to a sum
    on record; [parts whose bytes are not what refcache wrote]). Every reused part is hashed in full."""
    i, n = shard
    done, changed = {}, []
    recorded = recorded_sums(cache_dir)
    for f in sorted(Path(cache_dir).glob("part-*.parquet")):
        meta = part_meta(f)
        if not meta or meta.get("fingerprint") != fingerprint or f.name != part_name(meta["part"]["index"]):
            continue
        if meta["part"]["index"] % n != i:
            continue
        if file_sha256(f) in recorded.get(f.name, ()):
            done[meta["part"]["index"]] = meta
        else:
            changed.append(f)
    return done, changed


# ---------------------------------------------------------------- merge


def merge(cache_dir) -> dict:
    """Validate every part against the shard manifests and the sums on record; write rejected_rows.parquet,
    manifest.json and the readers' memo. Holds the cache's merge lock; a second merge is refused."""
    with DirLock(cache_dir, "merge", name="merge"):
        return _merge(Path(cache_dir))


def merge_unless_merging(cache_dir) -> dict | None:
    """merge(), or None when another process holds the merge lock (that one writes the manifest)."""
    lock = DirLock(cache_dir, "merge", name="merge")
    try:
        lock.acquire()
    except UserError:
        if lock.path.exists():
            return None
        raise
    try:
        return _merge(Path(cache_dir))
    finally:
        lock.release()


def _merge(cache_dir: Path) -> dict:
    shards = []
    for f in _side_files(cache_dir, "_shard-*.json"):
        m = read_json(f)
        if m is None:
            raise UserError(f"{f}: unreadable shard manifest; re-run that shard")
        shards.append(m)
    if not shards:
        raise UserError(f"{cache_dir}: no finished shard (no _shard-*.json); run precompute first")
    fps = {s["fingerprint"] for s in shards}
    if len(fps) > 1:
        raise UserError(f"{cache_dir}: shard manifests disagree on settings; the shards were run differently")
    first = shards[0]
    version = first["settings"].get("schema_version", 1)  # a version-1 cache stays one (layout, columns)
    num_chunks, rows_read = first["num_chunks"], first["rows_read"]
    if any(s["num_chunks"] != num_chunks or s["rows_read"] != rows_read for s in shards):
        raise UserError(f"{cache_dir}: shard manifests disagree on the input's size; was the input changed?")
    n = first["shard"]["count"]
    extra = sorted(f.name for f in cache_dir.glob("part-*.parquet")
                   if f.name not in {part_name(k) for k in range(num_chunks)})
    if extra:
        raise UserError(f"{cache_dir / extra[0]}: not a part of this cache (the input makes {num_chunks} parts); "
                        "move it out of the directory and re-run")

    recorded = recorded_sums(cache_dir)
    metas, sums, memo, missing = [], [], {}, []
    for k in range(num_chunks):
        path = cache_dir / part_name(k)
        m = part_meta(path)
        sha, key = _hash_part(path) if m is not None and m["fingerprint"] == first["fingerprint"] else (None, None)
        if sha is None or sha not in recorded.get(path.name, ()):  # missing, invalid, or changed since written
            missing.append(k)
        else:
            metas.append(m)
            sums.append(sha)
            if key:
                memo[path.name] = {**key, "sha256": sha}
    if missing:
        which = sorted({k % n for k in missing})
        raise UserError(f"{cache_dir}: {len(missing)} of {num_chunks} parts missing, invalid or changed since "
                        f"written (first: {part_name(missing[0])}); re-run shard(s) "
                        f"{', '.join(f'{i}/{n}' for i in which)} to (re)compute them")

    rejected = sorted((reject.as_row(r) for m in metas for r in m["part"]["rejected"]), key=lambda r: r[0])
    kept = sum(m["part"]["rows_kept"] for m in metas)
    read = sum(m["part"]["rows_read"] for m in metas)
    if read != rows_read or kept + len(rejected) != read:
        raise UserError(f"{cache_dir}: row counts do not add up (read {read} of {rows_read}, kept {kept}, "
                        f"rejected {len(rejected)}); delete the cache and re-run")
    rej = pa.table({"source_index": pa.array([r[0] for r in rejected], pa.int64()),
                    "source_file": pa.array([r[1] for r in rejected], pa.string()),
                    "reason_kind": pa.array([r[2] for r in rejected], pa.string()),
                    "reason": pa.array([r[3] for r in rejected], pa.string())}, schema=REJECTED_SCHEMA)
    rej_path = side_dir(cache_dir, version) / REJECTED_FILE
    atomic_write(rej_path, lambda tmp: pq.write_table(rej, tmp, compression="zstd"))

    scored = [m for m in metas if "version" in m["identity"]["backend"]]  # parts that loaded the backend
    ident = (scored or metas or [first])[0]["identity"]
    manifest = {
        "schema_version": version,
        "refcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": first["fingerprint"],
        "model": ident["model"],
        "tokenizer": ident["tokenizer"],
        "tokenization": ident["tokenization"],
        "backend": ident["backend"],
        "dataset": {**ident["dataset"], "rows_read": read, "rows_kept": kept, "rows_rejected": len(rejected),
                    # kept rows whose prompt tail merged into the completion (pipeline/tokenize.py); None when a
                    # part was written before they were counted
                    "boundary_merged": None if any("boundary_merged" not in m["part"] for m in metas)
                    else sum(m["part"]["boundary_merged"] for m in metas)},
        "shards": [{"file": part_name(k), "rows": m["part"]["rows_kept"],
                    "bytes": (cache_dir / part_name(k)).stat().st_size, "sha256": sha}
                   for k, (m, sha) in enumerate(zip(metas, sums))],
        "rejected_rows": {"file": rej_path.relative_to(cache_dir).as_posix(), "rows": len(rejected),
                          "by_kind": reject.by_kind(rejected)},
        "tokens": {"chosen": sum(m["part"]["chosen_tokens"] for m in metas),
                   "rejected": sum(m["part"]["rejected_tokens"] for m in metas),
                   "prompt": sum(m["part"]["prompt_tokens"] for m in metas)},
        "settings": first["settings"],
    }
    if version != 1:  # the input's own columns (pipeline/columns.py), as every part has them
        manifest["extra_columns"] = first["settings"]["extra_columns"]
        manifest["skipped_columns"] = first["settings"]["skipped_columns"]
    path = side_dir(cache_dir, version) / MANIFEST
    old = read_json(path)
    # re-running a finished cache: keep its manifest (and its sha256) unless something changed
    if old is None or {k: v for k, v in old.items() if k != "created"} != \
            {k: v for k, v in manifest.items() if k != "created"}:
        write_json(path, manifest)
    else:
        manifest = old
    write_memo(cache_dir, memo, version)
    return manifest


# ---------------------------------------------------------------- readers


def content_id(manifest: dict) -> str:
    """A cache's identity by content: its settings fingerprint and every part's sha256. A copy, a move or another
    mount of the cache keeps it; a rebuild with another model or other data changes it (a rebuild with the same
    settings writes the same bytes and keeps it). Runs record it and stage 3 checks it, not the path."""
    parts = [[s.get("file"), s.get("sha256")] for s in manifest.get("shards", []) if isinstance(s, dict)]
    return hashlib.sha256(json.dumps([manifest.get("fingerprint"), parts]).encode()).hexdigest()


def same_cache(recorded: dict | None, manifest: dict, manifest_sha256: str) -> bool | None:
    """Whether a cache (its manifest, and the sha256 of its manifest file) is the one a run recorded
    (`cache_fingerprint` in its config.json); None when the run recorded nothing to compare."""
    if not isinstance(recorded, dict):
        return None
    if recorded.get("content_sha256"):
        return recorded["content_sha256"] == content_id(manifest)
    if recorded.get("manifest_sha256"):  # runs from before content_sha256: the manifest file itself
        return recorded["manifest_sha256"] == manifest_sha256
    return None


def read_manifest(cache_dir) -> dict:
    path = manifest_path(cache_dir)
    if not path.exists():
        if any(Path(cache_dir).glob("part-*.parquet")):
            raise UserError(f"{cache_dir}: not a finished refcache cache (no manifest.json; parts exist: finish the "
                            "shards or run `refcache merge`)")
        raise UserError(f"{cache_dir}: not a cache directory (no manifest.json); pass the --out of "
                        "`refcache precompute`")
    m = read_json(path)
    if m is None:
        raise UserError(f"{path}: unreadable manifest; re-run precompute or `refcache merge`")
    v = m.get("schema_version")
    if v not in READABLE_VERSIONS:
        newer = isinstance(v, int) and v > SCHEMA_VERSION
        raise UserError(f"{path}: cache schema_version {v}, this refcache reads versions "
                        f"{', '.join(map(str, READABLE_VERSIONS))}; "
                        + ("a newer refcache wrote it: upgrade refcache" if newer else "re-run precompute"))
    return m


def _stat_key(st: os.stat_result) -> dict:
    return {"bytes": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _hash_part(path: Path):
    """(sha256, the file's stat key if it did not change while being hashed, else None); (None, None) if the
    file is gone."""
    try:
        before = _stat_key(os.stat(path))
        sha = file_sha256(path)
        after = _stat_key(os.stat(path))
    except FileNotFoundError:
        return None, None
    return sha, (before if before == after else None)


def write_memo(cache_dir: Path, entries: dict, version=SCHEMA_VERSION):
    """Record {part file: stat key + sha256} for readers (`check_parts`). Best effort: a memo that cannot be
    written only means readers hash in full."""
    memo = {"recorded_ns": time.time_ns(), "parts": entries}
    try:
        write_json(side_dir(cache_dir, version) / SUMS_MEMO, memo)
    except OSError:
        pass


def _read_memo(cache_dir: Path, version) -> tuple[int, dict]:
    m = read_json(side_dir(cache_dir, version) / SUMS_MEMO) or {}
    parts = m.get("parts")
    return (m.get("recorded_ns") or 0, parts) if isinstance(parts, dict) else (0, {})


def check_parts(cache_dir, manifest=None, full=False) -> list[Path]:
    """The part files the manifest lists, each checked before use; one-line UserError naming the file when a
    part is missing, extra (a part-*.parquet the manifest does not list), truncated or changed (size or
    sha256 differ from the manifest's).

    full=False (training, queries) re-hashes only parts whose file changed since the writer (or verify) hashed
    it: a part is taken as unchanged when its size, inode, mtime and ctime equal the memo's (_sums.json) and
    its ctime is older than the memo by RACY_NS. That catches every change made through the filesystem: a
    rewrite, an in-place edit, a copy, even one that restores the old mtime (the ctime moves). It cannot catch
    what bypasses the filesystem (a bit rotting on disk, a write to the raw device): `refcache verify` and
    every precompute/merge hash each part in full (full=True), and verify refreshes the memo."""
    cache_dir = Path(cache_dir)
    m = manifest or read_manifest(cache_dir)
    listed = [s.get("file") if isinstance(s, dict) else None for s in m.get("shards", [])]
    bad = [f for f in listed if not (isinstance(f, str) and PART_RE.fullmatch(f))]
    if bad:
        raise UserError(f"{manifest_path(cache_dir)}: bad part name {bad[0]!r} in its part list; re-run precompute")
    extra = sorted({f.name for f in cache_dir.glob("part-*.parquet")} - set(listed))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{cache_dir / extra[0]}: a part file the manifest does not list{more}; move it out of "
                        "the cache (its pairs would be counted twice or with other settings)")
    recorded_ns, memo = (0, {}) if full else _read_memo(cache_dir, m.get("schema_version"))
    paths, entries = [], {}
    for s in m["shards"]:
        path = cache_dir / s["file"]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: part listed in the manifest is missing; re-run precompute (same command) to "
                            "recompute it") from None
        if "bytes" in s and st.st_size != s["bytes"]:
            raise UserError(f"{path}: contents changed since the manifest was written ({st.st_size:,} bytes, the "
                            f"manifest says {s['bytes']:,}: truncated or rewritten); re-run precompute (same "
                            "command) to recompute it")
        if not s.get("sha256"):
            raise UserError(f"{manifest_path(cache_dir)} lists {s['file']} without a sha256; re-run precompute")
        key, e = _stat_key(st), memo.get(s["file"])
        if isinstance(e, dict) and e == {**key, "sha256": s["sha256"]} and key["ctime_ns"] < recorded_ns - RACY_NS:
            paths.append(path)
            continue
        sha, key = _hash_part(path)
        if sha != s["sha256"]:
            raise UserError(f"{path}: contents changed since the manifest was written (sha256 differs); re-run "
                            "precompute (same command) to recompute it")
        if key:
            entries[s["file"]] = {**key, "sha256": sha}
        paths.append(path)
    if full:
        write_memo(cache_dir, entries, m.get("schema_version"))
    return paths


def table_schema(manifest: dict) -> pa.Schema:
    """The columns `load_table` gives for a cache: the contract's (a version-1 cache's `ches` and `ln_ches`
    read as null), then the input's own columns the manifest lists."""
    return part_schema(manifest.get("extra_columns", []))


def load_table(cache_dir, columns=None) -> pa.Table:
    """All parts listed in the manifest (each checked by `check_parts`) as one table, ordered by source_index."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    schema = table_schema(m)
    unknown = [c for c in columns or () if c not in schema.names]
    if unknown:
        raise UserError(f"{cache_dir}: no column {unknown[0]!r} in this cache (columns: {', '.join(schema.names)})")
    want = schema.names if columns is None else list(dict.fromkeys([*columns, "source_index"]))
    absent = [c for c in want if m["schema_version"] == 1 and c in V2_COLUMNS]  # not in a version-1 part
    tables = []
    for path in check_parts(cache_dir, m):
        try:
            t = pq.read_table(path, columns=[c for c in want if c not in absent])
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: unreadable part ({e}); re-run precompute") from None
        for c in absent:
            t = t.append_column(schema.field(c), pa.nulls(t.num_rows, schema.field(c).type))
        tables.append(t.select(want).replace_schema_metadata(None))
    out_schema = pa.schema([schema.field(c) for c in want])
    t = pa.concat_tables(tables) if tables else out_schema.empty_table()
    t = t.sort_by("source_index")
    if columns is not None and "source_index" not in columns:
        t = t.drop(["source_index"])
    return t
