"""Stage 1 cache: the contract, resume after SIGKILL, shards + merge, settings refusal, verify."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.cache import META_KEY, load_table, read_manifest, rejected_path
from pipeline.data import Source, pair_id
from pipeline.fingerprint import file_sha256, model_identity, tokenizer_identity
from pipeline.precompute import precompute
from refcache import UserError
from refcache.cli import main as cli_main
from refcache_base.cache_schema import REJECTED_SCHEMA, part_schema

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"backend": "hf", "dtype": "float32", "limit": 48, "part_size": 2, "progress": False}  # 24 parts
PARTS = 24
MANIFEST_KEYS = {"schema_version", "refcache_version", "created", "fingerprint", "model", "tokenizer",
                 "tokenization", "backend", "dataset", "shards", "rejected_rows", "tokens", "settings",
                 "extra_columns", "skipped_columns"}


def cli(*args):
    return [sys.executable, "-m", "refcache.cli", *map(str, args)]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, tiny_model_dir, prefs_dir):
    """An uninterrupted single-process run: the reference for resume and shard equality."""
    out = tmp_path_factory.mktemp("small") / "cache"
    precompute(prefs_dir / "train.jsonl", tiny_model_dir, out, **SMALL)
    return out


def assert_same_cache(a, b):
    ta, tb = load_table(a), load_table(b)
    assert ta.num_rows == tb.num_rows > 0
    assert ta.column("pair_id").to_pylist() == tb.column("pair_id").to_pylist()
    assert ta.equals(tb), "cached ids/values differ"
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["fingerprint"] == mb["fingerprint"] and ma["dataset"] == mb["dataset"]
    assert pq.read_table(rejected_path(a, ma)).equals(pq.read_table(rejected_path(b, mb)))


def test_cache_matches_the_contract(train_cache, tiny_model_dir, prefs_dir):
    m = read_manifest(train_cache)
    assert set(m) == MANIFEST_KEYS
    assert m["model"] == model_identity(tiny_model_dir)
    assert m["tokenizer"] == tokenizer_identity(tiny_model_dir)
    assert m["backend"]["name"] == "hf" and m["backend"]["dtype"] == "float32" and m["backend"]["version"]
    assert m["tokenization"]["max_length"] == 1023 and m["tokenization"]["truncation_mode"] == "keep_end"
    ds = m["dataset"]
    assert ds["rows_read"] == 256 == ds["rows_kept"] + ds["rows_rejected"]
    assert ds["sha256"] == Source(prefs_dir / "train.jsonl").sha256()
    assert m["rejected_rows"]["file"] == "__refcache__/rejected_rows.parquet"  # out of the parts' glob
    rej = pq.read_table(train_cache / m["rejected_rows"]["file"])
    assert rej.schema.equals(REJECTED_SCHEMA) and rej.num_rows == ds["rows_rejected"]
    assert m["schema_version"] == 2
    assert m["extra_columns"] == [{"name": "category", "source": "category", "type": "string"}]
    assert m["skipped_columns"] == {}
    assert all(r for r in rej.column("reason").to_pylist())

    for s in m["shards"]:
        f = train_cache / s["file"]
        assert file_sha256(f) == s["sha256"]
        pf = pq.ParquetFile(f)
        assert pf.schema_arrow.remove_metadata().equals(part_schema(m["extra_columns"]))
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        meta = json.loads(pf.schema_arrow.metadata[META_KEY])
        for key in ("model", "tokenizer", "tokenization", "backend"):
            assert meta["identity"][key] == m[key]
        assert meta["fingerprint"] == m["fingerprint"]

    t = load_table(train_cache).to_pylist()
    assert len(t) == ds["rows_kept"] == sum(s["rows"] for s in m["shards"])
    assert [r["source_index"] for r in t] == sorted(r["source_index"] for r in t)
    lines = (prefs_dir / "train.jsonl").read_text().splitlines()
    eos = json.loads((tiny_model_dir / "config.json").read_text())["eos_token_id"]
    for r in t:
        src = json.loads(lines[r["source_index"]])
        assert r["pair_id"] == pair_id(src.get("prompt"), src["chosen"], src["rejected"])
        assert r["category"] == src["category"]  # the input's own column, kept
        assert r["ches"] is not None and r["ln_ches"] is not None  # the hf backend computes CHES
        for side in ("chosen", "rejected"):
            lp = np.asarray(r[f"ref_{side}_token_logps"], dtype=np.float32)
            assert len(lp) == len(r[f"{side}_ids"]) == r[f"{side}_len"] > 0
            assert np.all(lp <= 0) and np.isfinite(lp).all()
            assert r[f"ref_{side}_logp"] == pytest.approx(lp.astype(np.float64).sum(), abs=1e-9)
            assert r[f"{side}_ids"][-1] == eos or r["truncated"]
        assert r["prompt_len"] == len(r["prompt_ids"]) > 0
        n = r["shared_prefix_len"]
        assert r["chosen_ids"][:n] == r["rejected_ids"][:n]
        assert n == min(r["chosen_len"], r["rejected_len"]) or r["chosen_ids"][n] != r["rejected_ids"][n]
    # a pretrained reference: log-probs are far from uniform (ln 1/V)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    mean_lp = np.mean(np.concatenate([r["ref_chosen_token_logps"] for r in t]))
    assert mean_lp > -np.log(vocab) / 2

    cols = load_table(train_cache, columns=["pair_id", "ref_chosen_logp"])
    assert cols.column_names == ["pair_id", "ref_chosen_logp"] and cols.num_rows == len(t)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, small_cache, tiny_model_dir, prefs_dir):
    out = tmp_path / "cache"
    args = cli("precompute", prefs_dir / "train.jsonl", "--model", tiny_model_dir, "--out", out, "--backend", "hf",
               "--limit", 48, "--part-size", 2, "--no-progress")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (out / "part-00000.parquet").exists():
            assert proc.poll() is None, "precompute exited before writing its first part"
            assert time.time() < deadline, "no part written within 180 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "__refcache__" / "manifest.json").exists(), "the run finished before it could be killed"
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 1 <= len(written) < PARTS
    with pytest.raises(UserError, match="no manifest.json"):
        load_table(out)
    # a half-written temp file and a damaged part (e.g. a bad disk) are recomputed, not trusted
    (out / f".part-{PARTS - 1:05d}.parquet.tmp").write_bytes(b"half a parquet file")
    (out / written[-1]).write_bytes(b"garbage")
    summary = precompute(prefs_dir / "train.jsonl", tiny_model_dir, out, **SMALL)
    assert summary["complete"] and summary["parts_skipped"] == len(written) - 1
    assert summary["parts_written"] == PARTS - summary["parts_skipped"]
    assert not list(out.glob(".*.tmp"))
    assert_same_cache(out, small_cache)
    # a second re-run finds everything done and scores nothing
    again = precompute(prefs_dir / "train.jsonl", tiny_model_dir, out, **SMALL)
    assert again["parts_written"] == 0 and again["tokens"] == 0
    assert_same_cache(out, small_cache)


def test_two_shards_then_merge_equal_single_process(tmp_path, small_cache, tiny_model_dir, prefs_dir, capsys):
    out = tmp_path / "cache"
    r = subprocess.run(cli("precompute", prefs_dir / "train.jsonl", "--model", tiny_model_dir, "--out", out,
                           "--backend", "hf", "--limit", 48, "--part-size", 2, "--no-progress", "--shard", "0/2"),
                       cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert "shard 0/2 done" in r.stdout and not (out / "__refcache__" / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{k:05d}.parquet" for k in range(0, PARTS, 2)]
    assert cli_main(["merge", str(out)]) == 2
    assert "re-run shard(s) 1/2" in capsys.readouterr().err
    summary = precompute(prefs_dir / "train.jsonl", tiny_model_dir, out, shard="1/2", **SMALL)
    assert summary["complete"]  # the last shard to finish merges
    assert_same_cache(out, small_cache)
    assert cli_main(["merge", str(out)]) == 0
    assert "rows read 48" in capsys.readouterr().out
    assert_same_cache(out, small_cache)


def test_rerun_of_a_finished_cache_changes_nothing(tmp_path, small_cache, tiny_model_dir, prefs_dir):
    """Re-running the same command keeps every file byte-identical, so runs that fingerprinted the manifest
    (train --resume, the demo re-run) still match it."""
    out = tmp_path / "cache"
    shutil.copytree(small_cache, out)
    manifest = json.loads((out / "__refcache__" / "manifest.json").read_text())
    manifest["created"] = "2020-01-01T00:00:00Z"  # made earlier: a rewrite would show
    (out / "__refcache__" / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))

    def contract_files():  # parts, __refcache__/manifest.json and rejected_rows.parquet (not the _-prefixed
        # bookkeeping files: _shard-*.json progress notes, _written-*.jsonl write logs, the _sums.json memo)
        return {f.relative_to(out).as_posix(): f.read_bytes() for f in out.rglob("*")
                if f.is_file() and not f.name.startswith("_")}

    before = contract_files()
    assert "__refcache__/rejected_rows.parquet" in before and "__refcache__/manifest.json" in before
    precompute(prefs_dir / "train.jsonl", tiny_model_dir, out, **SMALL)
    assert contract_files() == before


def test_changed_settings_or_input_are_refused(tmp_path, small_cache, tiny_model_dir, prefs_dir):
    out = tmp_path / "cache"
    shutil.copytree(small_cache, out)
    with pytest.raises(UserError, match="tokenization differ"):
        precompute(prefs_dir / "train.jsonl", tiny_model_dir, out, **SMALL, max_length=600)
    with pytest.raises(UserError, match="limit differ"):
        precompute(prefs_dir / "train.jsonl", tiny_model_dir, out, **{**SMALL, "limit": 40})
    data = tmp_path / "train.jsonl"
    lines = (prefs_dir / "train.jsonl").read_text().splitlines()[:48]
    data.write_text("\n".join(lines) + "\n")
    part = tmp_path / "partial"
    precompute(data, tiny_model_dir, part, **{**SMALL, "limit": 4})
    data.write_text("\n".join(lines[:47]) + "\n")
    with pytest.raises(UserError, match="dataset_sha256 differ"):
        precompute(data, tiny_model_dir, part, **{**SMALL, "limit": 4})


def test_all_rows_rejected_is_an_error_with_reasons(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n{"prompt": "p"}\n')
    with pytest.raises(UserError, match="all 2 rows were rejected"):
        precompute(data, tiny_model_dir, tmp_path / "c", backend="hf", progress=False)
    rej = pq.read_table(tmp_path / "c" / "__refcache__" / "rejected_rows.parquet").to_pylist()
    assert [r["source_index"] for r in rej] == [0, 1]
    assert "identical" in rej[0]["reason"] and "missing field 'chosen'" in rej[1]["reason"]


def _rewrite_part(path, add):
    """Shift every cached chosen token log-prob of a part by `add` nats, and their sums to match (a wrong but
    self-consistent part: only re-scoring can tell), keeping its metadata."""
    t = pq.read_table(path)
    col = t.column("ref_chosen_token_logps").combine_chunks()
    shifted = type(col).from_arrays(col.offsets, pc.add(col.values, np.float32(add)))
    t = t.set_column(t.schema.get_field_index("ref_chosen_token_logps"), t.schema.field("ref_chosen_token_logps"),
                     shifted)
    sums = [float(np.asarray(x, np.float32).astype(np.float64).sum()) for x in shifted.to_pylist()]
    t = t.set_column(t.schema.get_field_index("ref_chosen_logp"), t.schema.field("ref_chosen_logp"),
                     pa.array(sums, pa.float64()))
    pq.write_table(t, path, compression="zstd")


def test_verify_passes_on_a_good_cache_and_fails_on_a_bad_one(tmp_path, eval_cache, capsys):
    assert cli_main(["verify", str(eval_cache), "--sample", "16"]) == 0
    out = capsys.readouterr().out
    assert "per-token |diff|: max" in out and "OK" in out
    bad = tmp_path / "bad"
    shutil.copytree(eval_cache, bad)
    part = bad / "part-00000.parquet"
    _rewrite_part(part, 1e-3)
    assert cli_main(["verify", str(bad), "--sample", "8"]) == 2  # part changed after the manifest: refused
    assert "contents changed" in capsys.readouterr().err
    m = json.loads((bad / "__refcache__" / "manifest.json").read_text())
    m["shards"][0].update(sha256=file_sha256(part), bytes=part.stat().st_size)  # as if blessed by a re-run
    (bad / "__refcache__" / "manifest.json").write_text(json.dumps(m))
    assert cli_main(["verify", str(bad), "--sample", "8", "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert not r["passed"] and r["max_abs_diff"] == pytest.approx(1e-3, rel=0.05)
    assert r["margin_error_max"] > 0.1 * 1e-3  # beta * (shift per token) * tokens
    assert cli_main(["verify", str(bad), "--sample", "8", "--tolerance", "0.01"]) == 0
    capsys.readouterr()


def _token_logps(cache):
    t = load_table(cache, ["ref_chosen_token_logps", "ref_rejected_token_logps"])
    return [np.asarray(x, np.float64) for c in t.columns for x in c.to_pylist()]


def test_compiled_hf_backend_matches_eager(tmp_path, eval_cache, tiny_model_dir, prefs_dir, capsys):
    """--compile runs the decoder through torch.compile: the same pairs and tokens, per-token log-probs within the
    1e-4 nats that backends must agree to in fp32. Three pairs per forward over 64 pairs leaves a lone pair in
    the last batch (a size-1 batch, which compile would otherwise specialise)."""
    out = tmp_path / "compiled"
    assert cli_main(["precompute", str(prefs_dir / "eval.jsonl"), "--model", str(tiny_model_dir), "--out", str(out),
                     "--backend", "hf", "--limit", "64", "--batch-size", "6", "--compile", "--no-progress"]) == 0
    capsys.readouterr()
    assert load_table(out, ["pair_id"]).equals(load_table(eval_cache, ["pair_id"]))
    diff = max(np.abs(a - b).max() for a, b in zip(_token_logps(out), _token_logps(eval_cache)))
    print(f"compiled vs eager hf, fp32: per-token max |diff| {diff:.2e}")
    assert diff < 1e-4
    assert read_manifest(out)["backend"]["settings"]["compile"] is True
    with pytest.raises(UserError, match="--compile applies to the hf backend"):
        precompute(prefs_dir / "eval.jsonl", tiny_model_dir, tmp_path / "v", backend="vllm", limit=4, compile=True)


def test_tokenize_pairs_gives_the_cache_rows(train_cache, tiny_model_dir, prefs_dir):
    """The public front end (bench/ uses it) yields exactly the pairs, ids and order precompute cached."""
    from pipeline.cache import load_table
    from pipeline.precompute import tokenize_pairs

    t = load_table(train_cache).to_pylist()
    pairs = list(tokenize_pairs(prefs_dir / "train.jsonl", tiny_model_dir, limit=256))
    assert len(pairs) == len(t) > 200
    for p, row in zip(pairs, t):
        assert p.pair.pair_id == row["pair_id"]
        assert (p.prompt_ids, p.chosen_ids, p.rejected_ids) == (row["prompt_ids"], row["chosen_ids"],
                                                                 row["rejected_ids"])
