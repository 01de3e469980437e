"""Faults II (issue 16), as a new user and a cluster scheduler meet them: precompute never writes into a folder it
did not make, stage 3 never joins a run to a cache it did not train on, paths are never glob patterns, a --where
subset is pinned, SIGTERM stops cleanly and resumes, a cache or run is identified by content (not by the path
spelling), a damaged latest checkpoint is passed over, and the smaller cases of point 8."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import one_line_error, rows_of, tree_digest

import queries
from pipeline.precompute import precompute
from refcache import UserError
from refcache.cli import main as cli_main
from refcache_base.lock import DirLock

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--probe-every", "2", "--probe-size", "8",
        "--threads", "1", "--no-progress", "--checkpoint-every", "2"]
KW = {"backend": "hf", "dtype": "float32", "progress": False}


def train_cli(cache, out, *extra, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "refcache.cli", "train", "--cache", str(cache), "--out", str(out),
                        *FAST, *map(str, extra)], check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run) -> list:
    return pq.read_table(Path(run) / "steps.parquet").column("loss").to_pylist()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, prefs_dir):
    d = tmp_path_factory.mktemp("data")
    rows_of(prefs_dir / "train.jsonl", d / "a.jsonl", stop=40)
    rows_of(prefs_dir / "train.jsonl", d / "b.jsonl", 40, 80)  # other pairs
    return d


# ---- 1. precompute --out never overwrites what refcache did not write ------------------------------------------


def test_precompute_refuses_a_folder_with_a_users_files(tmp_path, small_data, tiny_model_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), out / "part-00000.parquet")  # the user's own file, not ours
    before = tree_digest(out)
    err = one_line_error(capsys, ["precompute", small_data / "a.jsonl", "--model", tiny_model_dir, "--out", out,
                                  "--backend", "hf", "--no-progress"])
    assert "holds files refcache did not write (e.g. part-00000.parquet)" in err and "choose a new --out" in err
    assert tree_digest(out) == before  # untouched, no lock file left
    with pytest.raises(UserError, match="did not write"):  # the Python API says the same
        precompute(small_data / "a.jsonl", tiny_model_dir, out, **KW)
    assert tree_digest(out) == before


@pytest.mark.parametrize("where", ["input folder", "inside the input folder", "holding the input"])
def test_precompute_refuses_an_out_that_overlaps_the_input(tmp_path, small_data, tiny_model_dir, capsys, where):
    data_dir = tmp_path / "data"
    shutil.copytree(small_data, data_dir)
    data, out = {"input folder": (data_dir, data_dir), "inside the input folder": (data_dir, data_dir / "cache"),
                 "holding the input": (data_dir / "a.jsonl", data_dir)}[where]
    before = tree_digest(data_dir)
    err = one_line_error(capsys, ["precompute", data, "--model", tiny_model_dir, "--out", out, "--backend", "hf",
                                  "--no-progress"])
    assert "the input" in err and "a directory of its own" in err, err
    assert tree_digest(data_dir) == before and not (data_dir / "cache").exists()


def test_precompute_still_resumes_its_own_interrupted_cache(tmp_path, small_data, tiny_model_dir):
    """Our own partial cache (parts without a manifest, a part cut short, a temp file, a stale lock) is ours."""
    out = tmp_path / "c"
    ref = precompute(small_data / "a.jsonl", tiny_model_dir, out, part_size=16, **KW)
    sums = {s["file"]: s["sha256"] for s in json.loads((out / "__refcache__" / "manifest.json").read_text())["shards"]}
    (out / "__refcache__" / "manifest.json").unlink()
    part = out / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:200])  # cut off: no footer, so no metadata; on our write log
    (out / ".part-00002.parquet.123.tmp").write_bytes(b"half")
    s = precompute(small_data / "a.jsonl", tiny_model_dir, out, part_size=16, **KW)
    assert s["complete"] and s["parts_written"] == 1 and s["rows_kept"] == ref["rows_kept"]
    again = {s["file"]: s["sha256"] for s in json.loads((out / "__refcache__" / "manifest.json").read_text())["shards"]}
    assert again == sums


# ---- 2 and 6. a run is joined to, and resumed with, its cache by content -----------------------------------------


@pytest.fixture(scope="module")
def run_on_own_cache(tmp_path_factory, small_data, tiny_model_dir):
    """A cache of a.jsonl, a copy of it, a cache of other pairs (b.jsonl), and a finished 4-step run trained
    on the first."""
    root = tmp_path_factory.mktemp("own")
    cache = root / "cache"
    precompute(small_data / "a.jsonl", tiny_model_dir, cache, **KW)
    precompute(small_data / "b.jsonl", tiny_model_dir, root / "other", **KW)
    shutil.copytree(cache, root / "copy")
    train_cli(cache, root / "run")
    return root


def test_query_refuses_a_cache_rebuilt_with_other_data(tmp_path, run_on_own_cache, small_data, tiny_model_dir,
                                                       capsys):
    root = tmp_path / "w"
    shutil.copytree(run_on_own_cache, root)
    run, cache = root / "run", root / "cache"
    (run / "config.json").write_text((run / "config.json").read_text().replace(str(run_on_own_cache), str(root)))
    good = queries.run_query(queries.connect(runs=[run]), "displacement")
    shutil.rmtree(cache)
    precompute(small_data / "b.jsonl", tiny_model_dir, cache, **KW)  # same path, other pairs
    for argv in (["query", "displacement", "--run", run], ["report", run, "--out", tmp_path / "rep"],
                 ["query", "displacement", "--run", run, "--cache", cache]):
        err = one_line_error(capsys, argv)
        assert "is not the one run trained on" in err or "is not the cache any of the given runs trained on" in err
        assert "Pass --cache with the cache the run used" in err
    # the cache it trained on, now at another path (a copy): joined by content, the same result
    again = queries.run_query(queries.connect(runs=[run], caches=[root / "copy"]), "displacement")
    cols = [c for c in good.columns if c != "cache"]
    assert again.select(cols).equals(good.select(cols)) and len(good) > 0


def test_resume_through_another_path_to_the_same_cache(tmp_path, run_on_own_cache):
    """A symlink, `..` and a copy are the same cache: the resume is accepted and config.json records the path
    used now. A different cache is still refused."""
    root = tmp_path / "w"
    shutil.copytree(run_on_own_cache, root)
    run = root / "run"
    (root / "link").symlink_to(root / "copy")
    for spelling in (root / "link", root / "run" / ".." / "copy", root / "copy"):
        r = train_cli(spelling, run, "--resume")
        assert json.loads((run / "config.json").read_text())["cache"] == str(spelling), r.stderr
    assert losses(run) == losses(run_on_own_cache / "run")
    r = train_cli(root / "other", run, "--resume", check=False)  # another cache (other pairs)
    assert r.returncode == 2 and "is not the cache the run started with" in r.stderr, r.stderr


# ---- 3. paths are never glob patterns ------------------------------------------------------------------------


def test_bracketed_run_and_cache_names_read_their_own_files(tmp_path, run_on_own_cache, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(run_on_own_cache / "run", runs / "g[12]")
    shutil.copytree(run_on_own_cache / "run", runs / "g1")
    steps = pq.read_table(runs / "g1" / "steps.parquet")
    pq.write_table(steps.slice(0, 1), runs / "g1" / "steps.parquet")  # g1: 1 step; g[12]: 4
    cache = tmp_path / "c*?[x]"
    shutil.copytree(run_on_own_cache / "cache", cache)
    for argv, expected in (
            (["sql", "SELECT count(*) AS n FROM steps", "--run", runs / "g[12]", "--cache", cache, "--format", "csv"],
             "4"),
            (["sql", "SELECT count(*) AS n FROM steps", "--run", runs / "g1", "--cache", cache, "--format", "csv"],
             "1"),
            (["sql", "SELECT count(*) AS n FROM pairs", "--cache", cache, "--format", "csv"], "40")):
        assert cli_main([str(a) for a in argv]) == 0
        out = capsys.readouterr().out.split()
        assert out[-1] == expected, (argv, out)
    con = queries.connect(runs=[runs / "g[12]"], caches=[cache])
    assert con.execute("SELECT count(*) FROM examples").fetchone()[0] > 0


# ---- 4. --where's subset is pinned -------------------------------------------------------------------------------


def test_where_with_random_is_refused_on_resume(tmp_path, run_on_own_cache):
    run = tmp_path / "run"
    cache = run_on_own_cache / "cache"
    train_cli(cache, run, "--where", "random() < 0.5")
    cfg = json.loads((run / "config.json").read_text())
    assert len(cfg["where_pairs"]["pair_ids_sha256"]) == 64
    r = train_cli(cache, run, "--where", "random() < 0.5", "--resume", check=False)
    assert r.returncode == 2 and "now keeps other pairs than when the run started" in r.stderr, r.stderr
    # a predicate that keeps the same pairs resumes
    run2 = tmp_path / "run2"
    train_cli(cache, run2, "--where", "chosen_len > 2")
    train_cli(cache, run2, "--where", "chosen_len > 2", "--resume")


# ---- 5. SIGTERM: stop cleanly, keep what was written, release the lock, resume ------------------------------------


def _wait_for(path: Path, proc, seconds=180):
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared (rc {proc.poll()})"


def test_sigterm_in_train_checkpoints_and_resumes_exactly(tmp_path, run_on_own_cache):
    cache, run = run_on_own_cache / "cache", tmp_path / "run"
    args = ["--steps", "12", "--checkpoint-every", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "refcache.cli", "train", "--cache", str(cache), "--out",
                             str(run), *FAST, *args], cwd=ROOT, env={**os.environ, "REFCACHE_STEP_DELAY": "0.3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "checkpoints" / "step-00000002.pt", proc)  # in the loop
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].strip()
    assert proc.returncode == 143, err
    assert err.count("\n") == 0 and "stopped by SIGTERM after step" in err and "--resume" in err, err
    step = int(err.split("after step ")[1].split()[0])
    assert 2 <= step < 12 and (run / "checkpoints" / f"step-{step:08d}.pt").exists()
    assert not list(run.glob(".refcache-lock*")) and not list(run.rglob("*.tmp"))
    train_cli(cache, run, *args, "--resume")
    full = tmp_path / "full"
    train_cli(cache, full, *args)
    assert losses(run) == losses(full)


def test_sigterm_in_precompute_keeps_parts_and_releases_the_lock(tmp_path, prefs_dir, tiny_model_dir):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "refcache.cli", "precompute", str(prefs_dir / "train.jsonl"), "--model",
           str(tiny_model_dir), "--out", str(out), "--backend", "hf", "--part-size", "64", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for(out / "part-00001.parquet", proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    if proc.returncode == 0:
        pytest.skip("precompute finished before the signal")
    assert proc.returncode == 143 and "stopped by SIGTERM" in err[-1] and "re-run the same command" in err[-1]
    assert not list(out.glob(".refcache-lock*")) and not list(out.rglob("*.tmp"))
    r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "__refcache__" / "manifest.json").read_text())
    assert manifest["dataset"]["rows_read"] == 2403 and "reused" in r.stdout


def test_lock_of_a_dead_node_is_taken_over_after_its_lease(tmp_path, capsys, monkeypatch):
    lock = DirLock(tmp_path, "precompute")
    lock.path.write_text(json.dumps({"pid": 1, "host": "node-7", "what": "precompute", "since": "x"}))
    with pytest.raises(UserError, match="on host node-7.*not renewed for 600 s is taken over"):
        DirLock(tmp_path, "precompute").acquire()  # fresh: that node may be alive
    old = time.time() - 601
    os.utime(lock.path, (old, old))
    DirLock(tmp_path, "precompute").acquire().release()
    assert "has not renewed it for" in capsys.readouterr().err
    # a held lock is renewed by its holder
    monkeypatch.setattr("refcache_base.lock.HEARTBEAT_S", 0.05)
    with DirLock(tmp_path, "train") as held:
        os.utime(held.path, (old, old))
        time.sleep(0.3)
        assert time.time() - held.path.stat().st_mtime < 5


# ---- 7. a damaged latest checkpoint ----------------------------------------------------------------------------


def test_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, run_on_own_cache, capsys):
    cache, run = run_on_own_cache / "cache", tmp_path / "run"
    shutil.copytree(run_on_own_cache / "run", run)
    latest = run / "checkpoints" / "step-00000004.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a node died while writing it
    r = train_cli(cache, run, "--resume")
    assert "step-00000004.pt: cannot be read" in r.stderr and "resumed from step-00000002.pt" in r.stderr
    assert losses(run) == losses(run_on_own_cache / "run")
    for ckpt in (run / "checkpoints").glob("step-*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    err = one_line_error(capsys, ["train", "--cache", cache, "--out", run, *FAST, "--resume"])
    assert "cannot be read" in err and "nor can any earlier checkpoint" in err


# ---- 8. the smaller cases --------------------------------------------------------------------------------------


def test_eval_cache_equal_to_train_cache_is_said(tmp_path, run_on_own_cache):
    cache = run_on_own_cache / "cache"
    r = train_cli(cache, tmp_path / "run", "--eval-cache", run_on_own_cache / "copy")
    assert "is the training cache itself" in r.stdout + r.stderr


def test_report_writes_to_the_current_directory_not_the_run(tmp_path, run_on_own_cache, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_on_own_cache / "run", run)
    before = tree_digest(run)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["report", str(run), "--cache", str(run_on_own_cache / "cache")]) == 0, capsys.readouterr()
    assert (tmp_path / "report" / "report.html").exists() and tree_digest(run) == before


def test_duckdb_spills_to_the_system_temp_folder(tmp_path, run_on_own_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    con = queries.connect(runs=[run_on_own_cache / "run"])
    temp = con.execute("SELECT current_setting('temp_directory')").fetchone()[0]
    assert Path(temp).is_relative_to(tempfile.gettempdir()) and not (tmp_path / ".tmp").exists()
    assert math.isfinite(con.execute("SELECT avg(loss) FROM steps").fetchone()[0])
