"""Fault injection (issue 10): kills, damaged and stray cache files, concurrent writers, a full disk, bad input
rows and out-of-range arguments. Each leaves either a correct result or one line naming what to fix, and what is
left behind resumes to exactly the uninterrupted result.

Most builds run in this process with one shared scorer (tiny model, 12 rows, 3 parts of 4 rows); concurrent
writers and the full disk need separate processes.
"""

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import one_line_error, rows_of

import queries
from dpo import data as D
from pipeline import cache
from pipeline.cache import load_table, read_manifest
from pipeline.data import Source, normalize, pair_id
from pipeline.fingerprint import file_sha256
from pipeline.precompute import precompute
from refcache import UserError
from refcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ROWS = 12
PART = 4  # 3 parts
KW = {"backend": "hf", "dtype": "float32", "part_size": PART, "progress": False}


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from pipeline.backends import HFScorer

    return HFScorer(tiny_model_dir, "float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory, prefs_dir):
    return rows_of(prefs_dir / "train.jsonl", tmp_path_factory.mktemp("faults") / "pairs.jsonl", stop=ROWS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, tiny_model_dir, scorer):
    """The uninterrupted build every faulty one is compared with."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    precompute(data, tiny_model_dir, out, scorer=scorer, **KW)
    return out


def build(data, model, out, scorer, **kw):
    return precompute(data, model, out, scorer=scorer, **{**KW, **kw})


def assert_same_cache(a, b):
    """Same rows bit for bit, same identity and counts, same rejected rows."""
    ta, tb = load_table(a), load_table(b)
    assert ta.num_rows == tb.num_rows > 0 and ta.equals(tb)
    ma, mb = read_manifest(a), read_manifest(b)
    for key in ("fingerprint", "dataset", "tokens", "model", "tokenization"):
        assert ma[key] == mb[key], key
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    rej = [pq.read_table(Path(d) / "__refcache__" / "rejected_rows.parquet") for d in (a, b)]
    assert rej[0].equals(rej[1])


def flip_bit(path, where=0.4):
    """Flip one bit in place, inside the column data (not the footer), keeping the file's size."""
    with open(path, "r+b") as fh:
        fh.seek(int(os.path.getsize(path) * where))
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x10]))


# ---------------------------------------------------------------- kill points


class Killed(BaseException):
    """Stands in for SIGKILL at a chosen point: nothing after it runs (not an Exception, so nothing catches it)."""


# os.replace is how every cache file becomes visible (temp + rename): parts 0-2, __refcache__/_shard-0-of-1.json,
# __refcache__/rejected_rows.parquet, manifest.json, __refcache__/_sums.json. Kill just before or just after the
# N-th rename.
KILL_POINTS = [("before", 1), ("after", 1), ("after", 3), ("before", 5), ("before", 6), ("after", 6), ("before", 7)]


@pytest.mark.parametrize("when,n", KILL_POINTS, ids=[f"{w}-rename-{n}" for w, n in KILL_POINTS])
def test_kill_then_resume_equals_uninterrupted(tmp_path, monkeypatch, data, tiny_model_dir, scorer, reference,
                                               when, n):
    out = tmp_path / "cache"
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if when == "before" and len(calls) == n:
            raise Killed
        real(src, dst)
        if when == "after" and len(calls) == n:
            raise Killed

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        build(data, tiny_model_dir, out, scorer)
    monkeypatch.setattr(os, "replace", real)
    if not (n > 6 or (when, n) == ("after", 6)):  # manifest.json is the 6th rename
        with pytest.raises(UserError, match="no manifest.json"):
            D.load_pairs(out)
    # a log line cut off by the kill is ignored; the temp file the kill left is cleaned up
    with open(out / cache.written_log(0, 1), "a") as fh:
        fh.write('{"file": "part-000')
    summary = build(data, tiny_model_dir, out, scorer)
    assert summary["complete"]
    assert summary["parts_skipped"] == min(n if when == "after" else n - 1, 3)
    assert_same_cache(out, reference)
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".refcache-lock*"))


def test_sigkill_leaves_a_stale_lock_that_the_resume_takes_over(tmp_path, data, tiny_model_dir, reference, capsys):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "refcache.cli", "precompute", data, "--model", tiny_model_dir,
                             "--out", out, "--backend", "hf", "--part-size", str(PART), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (out / "part-00000.parquet").exists():
            assert proc.poll() is None and time.time() < deadline, "no part written"
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait()
    assert (out / ".refcache-lock-shard-0-of-1").exists()
    assert cli_main(["precompute", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--backend", "hf",
                     "--part-size", str(PART), "--no-progress"]) == 0
    assert "taking over a stale lock" in capsys.readouterr().err
    assert_same_cache(out, reference)


# ---------------------------------------------------------------- damaged, missing and stray parts


def refused_everywhere(cache_dir, tmp_path, capsys, needle):
    """train, query, sql, verify and the Python readers all refuse the cache with one line containing needle."""
    with pytest.raises(UserError, match=needle):
        D.load_pairs(cache_dir)
    with pytest.raises(UserError, match=needle):
        queries.connect([], caches=[cache_dir])
    for argv in (["train", "--cache", cache_dir, "--out", tmp_path / "run", "--steps", 1],
                 ["query", "cache_overview", "--cache", cache_dir],
                 ["sql", "SELECT count(*) FROM pairs", "--cache", cache_dir],
                 ["verify", cache_dir, "--sample", 2]):
        assert needle in one_line_error(capsys, argv), argv


def test_bit_flip_is_refused_then_recomputed_not_blessed(tmp_path, data, tiny_model_dir, scorer, reference, capsys):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    manifest = (out / "__refcache__" / "manifest.json").read_bytes()
    part = out / "part-00001.parquet"
    flip_bit(part)
    refused_everywhere(out, tmp_path, capsys, f"{part}: contents changed since the manifest was written")
    # re-running precompute (what the message says) recomputes that part; it does not record the bad one's sum
    summary = build(data, tiny_model_dir, out, scorer)
    assert summary["parts_written"] == 1 and summary["parts_skipped"] == 2
    assert "part-00001.parquet: its bytes are not what refcache wrote" in capsys.readouterr().err
    assert (out / "__refcache__" / "manifest.json").read_bytes() == manifest
    assert_same_cache(out, reference)
    assert cli_main(["verify", str(out), "--sample", "2"]) == 0


def test_memo_skips_hashing_unchanged_parts_but_not_a_touched_one(tmp_path, monkeypatch, reference):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)  # new inodes: the memo no longer matches, every part is hashed
    hashed = []
    real = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    load_table(out)
    assert len(hashed) == 3
    monkeypatch.setattr(cache, "RACY_NS", 0)  # pretend the hashing happened long after the parts were written
    cache.check_parts(out, full=True)  # verify's full check records the memo
    hashed.clear()
    load_table(out)
    assert hashed == []
    # an in-place bit flip that even restores the old mtime still moves the ctime: hashed, and refused
    part = out / "part-00002.parquet"
    st = part.stat()
    flip_bit(part, 0.5)
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(UserError, match="part-00002.parquet: contents changed"):
        load_table(out)
    assert hashed == ["part-00002.parquet"]


def test_deleted_or_truncated_part_is_refused_and_rebuilt(tmp_path, data, tiny_model_dir, scorer, reference,
                                                          capsys):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    (out / "part-00001.parquet").unlink()
    refused_everywhere(out, tmp_path, capsys, "part-00001.parquet: part listed in the manifest is missing")
    assert build(data, tiny_model_dir, out, scorer)["parts_written"] == 1
    assert_same_cache(out, reference)
    part = out / "part-00002.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    refused_everywhere(out, tmp_path, capsys, "part-00002.parquet: contents changed")


def test_extra_part_is_refused_not_counted(tmp_path, reference, capsys):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    shutil.copy(out / "part-00000.parquet", out / "part-00003.parquet")
    refused_everywhere(out, tmp_path, capsys, "part-00003.parquet: a part file the manifest does not list")
    assert "part-00003.parquet: not a part of this cache" in one_line_error(capsys, ["merge", out])


def test_verify_checks_every_pairs_sums_and_lengths(tmp_path, data, tiny_model_dir, scorer, reference, capsys):
    """A part whose stored sum no longer matches its token log-probs, with the manifest's sum updated to match
    (as an older precompute re-run did): verify reads every pair, not only the sample, and names it."""
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    part = out / "part-00001.parquet"
    pf = pq.ParquetFile(part)
    t = pf.read()
    sums = t.column("ref_chosen_logp").to_numpy().copy()
    sums[2] += 1.0
    t = t.set_column(t.schema.get_field_index("ref_chosen_logp"), "ref_chosen_logp", pa.array(sums))
    pq.write_table(t.replace_schema_metadata(pf.schema_arrow.metadata), part, compression="zstd")
    m = json.loads((out / "__refcache__" / "manifest.json").read_text())
    m["shards"][1].update(sha256=file_sha256(part), bytes=part.stat().st_size)
    (out / "__refcache__" / "manifest.json").write_text(json.dumps(m))
    src = t.column("source_index")[2].as_py()
    err = one_line_error(capsys, ["verify", out, "--sample", 1])
    assert f"source_index {src}: stored ref_chosen_logp" in err and "is not the sum of its" in err
    # precompute knows the sum it wrote: the part is recomputed, the manifest corrected
    build(data, tiny_model_dir, out, scorer)
    assert_same_cache(out, reference)
    # lengths that disagree with the ids
    t = pq.read_table(part)
    lens = t.column("rejected_len").to_numpy().copy()
    lens[0] += 1
    t = t.set_column(t.schema.get_field_index("rejected_len"), "rejected_len", pa.array(lens, pa.int32()))
    pq.write_table(t, part, compression="zstd")
    m = json.loads((out / "__refcache__" / "manifest.json").read_text())
    m["shards"][1].update(sha256=file_sha256(part), bytes=part.stat().st_size)
    (out / "__refcache__" / "manifest.json").write_text(json.dumps(m))
    assert "rejected_len" in one_line_error(capsys, ["verify", out, "--sample", 1])


# ---------------------------------------------------------------- concurrent writers

HOLD = """
import json, sys, time
from pathlib import Path
from pipeline import cache
from pipeline.precompute import precompute

started, release, kwargs = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
write_part = cache.write_part


def held(*args, **kw):  # before the first part is written: say so, then wait to be released
    if not started.exists():
        started.touch()
        deadline = time.time() + 300
        while not release.exists() and time.time() < deadline:
            time.sleep(0.02)
    write_part(*args, **kw)


cache.write_part = held
print(json.dumps(precompute(**kwargs, progress=False)))
"""


def start_held(tmp_path, name, **kwargs):
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    started, release = tmp_path / f"{name}.started", tmp_path / f"{name}.release"
    argv = [sys.executable, str(script), str(started), str(release), json.dumps(kwargs, default=str)]
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not started.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"{name} did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return proc, release


def finish(proc, release) -> dict:
    release.touch()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_second_writer_with_other_settings_is_refused_first_finishes(tmp_path, data, tiny_model_dir, reference,
                                                                     capsys):
    """Two precompute processes into one --out, fp32 and bf16, the second started while the first has scored
    its first part but not written it: the second is refused; the first finishes with a correct cache."""
    out = tmp_path / "cache"
    first, release = start_held(tmp_path, "fp32", data=data, model=tiny_model_dir, out=out, backend="hf",
                                dtype="float32", part_size=PART)
    try:
        err = one_line_error(capsys, ["precompute", data, "--model", tiny_model_dir, "--out", out, "--backend",
                                      "hf", "--dtype", "bfloat16", "--part-size", PART, "--no-progress"])
        assert f"{out} is being written by another refcache precompute (pid {first.pid}" in err
        assert "no finished shard" in one_line_error(capsys, ["merge", out])  # nothing to merge yet
    finally:
        summary = finish(first, release)
    assert summary["complete"] and summary["dtype"] == "float32"
    assert_same_cache(out, reference)


def test_shards_run_side_by_side(tmp_path, monkeypatch, data, tiny_model_dir, reference):
    """One lock per shard: shards 0/2 and 1/2 write the same cache at the same time (two threads here, each with
    its own scorer, both paused after their first part until both hold their lock); one of them merges."""
    import threading

    from pipeline.backends import HFScorer

    out, barrier = tmp_path / "cache", threading.Barrier(2, timeout=120)
    write_part = cache.write_part

    def held(*args, **kw):
        write_part(*args, **kw)
        if not getattr(pause, "done", False):
            pause.done = True
            assert len(list(out.glob(".refcache-lock-shard-*-of-2"))) in (1, 2)
            barrier.wait()  # both shards are writing now
            assert sorted(f.name for f in out.glob(".refcache-lock-shard-*")) == [
                ".refcache-lock-shard-0-of-2", ".refcache-lock-shard-1-of-2"]

    pause = threading.local()
    monkeypatch.setattr(cache, "write_part", held)
    results, errors = {}, []

    scorers = {shard: HFScorer(tiny_model_dir, "float32") for shard in ("0/2", "1/2")}  # loading is not thread-safe

    def run(shard):
        try:
            results[shard] = build(data, tiny_model_dir, out, scorers[shard], shard=shard)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(shard,)) for shard in ("0/2", "1/2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert sum(r["complete"] for r in results.values()) <= 1
    if not any(r["complete"] for r in results.values()):  # each finished while the other was merging
        cache.merge(out)
    assert_same_cache(out, reference)


def test_a_second_merge_is_refused(tmp_path, reference, capsys):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    from refcache_base.lock import DirLock

    with DirLock(out, "merge", name="merge"):
        assert "being written by another refcache merge" in one_line_error(capsys, ["merge", out])
    assert cli_main(["merge", str(out)]) == 0


# ---------------------------------------------------------------- full disk

FULL_DISK = """
import io, json, os, shutil, subprocess, sys
from contextlib import redirect_stderr
from pathlib import Path
from refcache.cli import main

mode, data, model, keep, room = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
argv = ["precompute", data, "--model", model, "--backend", "hf", "--part-size", "4", "--no-progress"]
runs = []


def run(out):
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(argv + ["--out", str(out)])
    runs.append({"rc": rc, "err": err.getvalue(), "parts": sorted(p.name for p in out.glob("part-*.parquet"))})


if mode == "tmpfs":  # a 1 MiB filesystem in a private mount namespace, filled up but for `room` bytes
    mnt = keep.parent / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    filler = mnt / "filler"
    vfs = os.statvfs(mnt)
    filler.write_bytes(b"x" * (vfs.f_bavail * vfs.f_frsize - room))
    run(mnt / "cache")
    filler.unlink()  # free space, then re-run the same command
    run(mnt / "cache")
    shutil.copytree(mnt / "cache", keep)
else:  # no mounting allowed: a file-size limit (RLIMIT_FSIZE) smaller than a part makes writing it fail
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, hard))
    run(keep)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    run(keep)
print(json.dumps(runs))
"""


def can_mount_tmpfs() -> bool:
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def test_full_disk_is_one_line_and_resumes(tmp_path, data, tiny_model_dir, reference):
    """On a small tmpfs in a private mount namespace (`unshare -rm`: root in a user namespace) where the machine
    allows it; otherwise a file-size limit (RLIMIT_FSIZE -> EFBIG), which fails the same write the same way."""
    mode = "tmpfs" if can_mount_tmpfs() else "rlimit"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    keep = tmp_path / "cache"
    # room for the first part (in whole 4 KiB pages) and 8 KiB of bookkeeping: the second part does not fit
    room = -(-(reference / "part-00000.parquet").stat().st_size // 4096) * 4096 + 8 * 1024
    argv = [sys.executable, script, mode, data, tiny_model_dir, keep, room]
    if mode == "tmpfs":
        argv = ["unshare", "-rm", *argv]
    r = subprocess.run([str(a) for a in argv], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       check=False, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    full, resumed = json.loads(r.stdout.strip().splitlines()[-1])
    print(mode, full)
    assert full["rc"] == 2 and full["err"].count("\n") == 1 and "Traceback" not in full["err"]
    want = ("disk full writing " if mode == "tmpfs" else "file too large writing ")
    assert want in full["err"] and "re-run to resume" in full["err"]
    assert str(Path(full["err"].split(want)[1].split(";")[0].split(" (")[0]).parent).endswith("cache")
    if mode == "tmpfs":
        assert full["parts"] == ["part-00000.parquet"]  # what fitted is kept for the resume
    assert resumed["rc"] == 0, resumed["err"]
    assert_same_cache(keep, reference)
    assert not list(keep.glob(".*.tmp"))


def test_os_errors_are_one_line(monkeypatch, capsys):
    from pipeline import cli as pipeline_cli
    from refcache.cli import os_error_line

    assert os_error_line(OSError(28, "No space left on device", "/c/part-00001.parquet")) == \
        "disk full writing /c/part-00001.parquet; free space and re-run to resume"
    assert os_error_line(OSError(13, "Permission denied", "/c/x")) == "/c/x: Permission denied"
    # a library that reports a full disk in its own exception type (safetensors does, from a checkpoint write)
    for error in (OSError(28, "No space left on device"),
                  RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")):
        monkeypatch.setattr(pipeline_cli, "run_merge", lambda args, e=error: (_ for _ in ()).throw(e))
        err = one_line_error(capsys, ["merge", "somewhere"])
        assert "disk full" in err and "free space and re-run to resume" in err


# ---------------------------------------------------------------- bad input rows

GOOD = {"prompt": "Say hi.", "chosen": " Hi there!", "rejected": " No."}


def deeply_nested(depth=100_000):
    return '{"prompt": ' + "[" * depth + "]" * depth + ', "chosen": "a", "rejected": "b"}'


def test_rows_not_builds_fail(tmp_path, tiny_model_dir, scorer):
    """A row nested too deeply (RecursionError) and a row holding a lone surrogate (UnicodeEncodeError) are
    rejected with their reason; the build goes on. JSON arrays too."""
    lines = [json.dumps(GOOD), deeply_nested(), json.dumps({**GOOD, "prompt": "x\ud800"}),
             json.dumps({**GOOD, "chosen": " Hello!"}), json.dumps({**GOOD, "rejected": "\udfff"})]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "rows.json").write_text("[" + ",\n".join(lines) + "]")
    for name in ("rows.jsonl", "rows.json"):
        s = build(tmp_path / name, tiny_model_dir, tmp_path / f"cache-{name}", scorer)
        assert (s["rows_read"], s["rows_kept"], s["rows_rejected"]) == (5, 2, 3), name
        rej = pq.read_table(tmp_path / f"cache-{name}" / "__refcache__" / "rejected_rows.parquet").to_pylist()
        reasons = {r["source_index"]: r["reason"] for r in rej}
        assert "nested too deeply" in reasons[1], reasons
        assert "invalid text: '\\ud800'" in reasons[2] and "invalid text: '\\udfff'" in reasons[4], reasons


def test_a_tokenizer_error_rejects_only_its_row(tmp_path, monkeypatch, tiny_model_dir, scorer):
    """Any exception while tokenizing one pair (here: the tokenizer itself raises on one text) rejects that
    pair with its reason; the other pairs of the batch are kept."""
    from transformers import AutoTokenizer

    cls = type(AutoTokenizer.from_pretrained(tiny_model_dir))
    call = cls.__call__

    def fragile(self, text, *args, **kw):
        if any("boom" in t for t in (text if isinstance(text, list) else [text])):
            raise RuntimeError("tokenizer panicked")
        return call(self, text, *args, **kw)

    monkeypatch.setattr(cls, "__call__", fragile)
    rows = [GOOD, {**GOOD, "prompt": "boom?"}, {**GOOD, "chosen": " Hello!"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = build(tmp_path / "rows.jsonl", tiny_model_dir, tmp_path / "cache", scorer)
    assert (s["rows_read"], s["rows_kept"], s["rows_rejected"]) == (3, 2, 1)
    rej = pq.read_table(tmp_path / "cache" / "__refcache__" / "rejected_rows.parquet").to_pylist()
    assert [(r["source_index"], r["reason"]) for r in rej] == [
        (1, "cannot process this row (RuntimeError: tokenizer panicked)")]


def write_formats(d: Path, rows, bom: bool):
    """rows as JSONL, JSON and CSV, each plain, gzip and zstd; with a UTF-8 BOM in front when `bom`."""
    import csv
    import io

    head = "\ufeff" if bom else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["prompt", "chosen", "rejected"])
    w.writeheader()
    w.writerows(rows)
    texts = {"jsonl": "".join(json.dumps(r) + "\n" for r in rows), "json": json.dumps(rows, indent=1),
             "csv": buf.getvalue()}
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt, text in texts.items():
        raw = (head + text).encode("utf-8")
        (d / f"rows.{fmt}").write_bytes(raw)
        (d / f"rows.{fmt}.gz").write_bytes(gzip.compress(raw))
        with pa.output_stream(str(d / f"rows.{fmt}.zst"), compression="zstd") as fh:
            fh.write(raw)
        out += [d / f"rows.{fmt}", d / f"rows.{fmt}.gz", d / f"rows.{fmt}.zst"]
    return out


def read_pairs(path):
    src = Source(path)
    return [normalize(r, src.columns) for r in src.rows()]


ROWS5 = [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}."} for i in range(5)]
WANT5 = [pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in ROWS5]


def test_bom_is_dropped_in_every_text_format(tmp_path):
    """A CSV from Excel (UTF-8 BOM) lost its prompt column; a JSONL with a BOM rejected row 0."""
    for path in write_formats(tmp_path, ROWS5, bom=True)[::3]:  # .jsonl, .json, .csv
        got = read_pairs(path)
        assert [p.pair_id for p in got] == WANT5, path
        assert [p.prompt for p in got] == [r["prompt"] for r in ROWS5], path


def test_compressed_inputs_read_the_same_pairs(tmp_path):
    """.gz and .zst JSONL/JSON/CSV (with or without a BOM), alone or in a directory, stream the same pairs."""
    for bom in (False, True):
        for path in write_formats(tmp_path / f"bom-{bom}", ROWS5, bom):
            assert [p.pair_id for p in read_pairs(path)] == WANT5, path
    src = Source(tmp_path / "bom-True")
    assert src.kind == "directory" and len(src.files) == 9 and len(read_pairs(tmp_path / "bom-True")) == 45


def test_damaged_compressed_input_is_one_line(tmp_path):
    raw = gzip.compress("".join(json.dumps(GOOD) + "\n" for _ in range(2000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=r"cut.jsonl.gz: cannot read past line \d+ .*damaged or incomplete"):
        read_pairs(tmp_path / "cut.jsonl.gz")


# ---------------------------------------------------------------- duplicates


def test_duplicates_keep_pair_id_unique_whatever_the_sharding(tmp_path, tiny_model_dir, scorer, capsys):
    """The same pair three times was kept three times under one pair_id. Now the first copy is kept and the
    later ones are rejected as duplicates of it, identically for 1 or 2 shards; rows read = kept + rejected."""
    a, b, c = GOOD, {**GOOD, "chosen": " Hello."}, {**GOOD, "prompt": "Greet me."}
    rows = [a, b, a, c, b, a, {**a, "rejected": " Go away."}]  # a x3, b x2; the last differs from a
    data = tmp_path / "dups.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one = build(data, tiny_model_dir, tmp_path / "one", scorer, part_size=2)
    assert (one["rows_read"], one["rows_kept"], one["rows_rejected"]) == (7, 4, 3)
    rej = pq.read_table(tmp_path / "one" / "__refcache__" / "rejected_rows.parquet").to_pylist()
    assert [(r["source_index"], r["reason"].split(" (")[0]) for r in rej] == [
        (2, "duplicate of row 0"), (4, "duplicate of row 1"), (5, "duplicate of row 0")]
    ids = load_table(tmp_path / "one", ["pair_id", "source_index"]).to_pydict()
    assert ids["source_index"] == [0, 1, 3, 6] and len(set(ids["pair_id"])) == 4
    con = queries.connect([], caches=[tmp_path / "one"])
    assert con.execute("SELECT count(*), count(DISTINCT pair_id) FROM pairs").fetchone() == (4, 4)
    for shard in ("1/2", "0/2"):  # shard 1 first: its duplicates are of rows in shard 0's parts
        two = build(data, tiny_model_dir, tmp_path / "two", scorer, part_size=2, shard=shard)
    assert two["complete"]
    assert_same_cache(tmp_path / "two", tmp_path / "one")
    assert cli_main(["verify", str(tmp_path / "one"), "--sample", "1"]) == 0
    capsys.readouterr()


def test_seen_pairs_finds_the_first_row_of_every_pair():
    """The compact set behind the duplicate rule against a dict, over many merges of its sorted runs."""
    import hashlib

    from pipeline.dedup import SeenPairs

    rng = np.random.default_rng(0)
    ids = [hashlib.sha256(str(x).encode()).hexdigest()[:32] for x in rng.integers(0, 6000, 20_000)]
    seen, got = SeenPairs(), []
    for start in range(0, len(ids), 333):
        got += list(seen.first_rows(ids[start:start + 333], np.arange(start, min(len(ids), start + 333)))[0])
    first = {}
    assert got == [first.setdefault(p, i) for i, p in enumerate(ids)]
    assert len(seen) == len(first) and len(seen.runs) < 12


# ---------------------------------------------------------------- numeric arguments

BAD_ARGS = [("--max-prompt-length", "-5"), ("--max-length", "1"), ("--batch-size", "0"), ("--part-size", "0"),
            ("--limit", "0"), ("--limit", "-3"), ("--shard", "2/2"), ("--shard", "-1/2"), ("--shard", "a/b"),
            ("--gpu-memory-utilization", "nan"), ("--gpu-memory-utilization", "1.5"),
            ("--gpu-memory-utilization", "0"), ("--tensor-parallel-size", "0"), ("--max-model-len", "1"),
            ("--kv-cache-gib", "nan"), ("--kv-cache-gib", "-1"), ("--kv-cache-gib", "inf")]


@pytest.mark.parametrize("flag,value", BAD_ARGS)
def test_numeric_arguments_are_checked_before_any_work(tmp_path, capsys, data, tiny_model_dir, flag, value):
    out = tmp_path / "cache"
    err = one_line_error(capsys, ["precompute", data, "--model", tiny_model_dir, "--out", out, "--backend", "hf",
                                  "--part-size", PART, f"{flag}={value}"])
    assert f"{flag} {value}: must be " in err, err
    assert not out.exists()  # refused before anything was made


def test_python_api_gets_the_same_checks(tmp_path, data, tiny_model_dir):
    for kw, flag in (({"max_prompt_length": -5}, "--max-prompt-length"), ({"max_prompt_length": 0},
                     "--max-prompt-length"), ({"part_size": float("nan")}, "--part-size"),
                     ({"batch_size": 2.5}, "--batch-size"), ({"gpu_memory_utilization": float("inf")},
                     "--gpu-memory-utilization"), ({"limit": True}, "--limit"), ({"shard": (3, 2)}, "--shard")):
        with pytest.raises(UserError, match=flag):
            precompute(data, tiny_model_dir, tmp_path / "cache", backend="hf", **kw)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag,value", [("--sample", "0"), ("--sample", "-3"), ("--tolerance", "nan"),
                                        ("--tolerance", "-1"), ("--rtol", "inf"), ("--rtol", "-0.1"),
                                        ("--beta", "nan"), ("--beta", "0")])
def test_verify_arguments_are_checked_first(tmp_path, capsys, flag, value):
    err = one_line_error(capsys, ["verify", tmp_path / "no-cache", f"{flag}={value}"])
    assert f"error: {flag} {value}" in err and "must be" in err, err
