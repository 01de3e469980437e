"""`refcache train --where SQL`: training on the pairs of the cache a predicate over the `pairs` view keeps (the
input's own columns included), recorded in the run config, refused on resume when it changes; one-line errors
for a predicate DuckDB cannot run or one that keeps nothing. `refcache sweep` takes it too."""

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import one_line_error

from dpo import data as D
from dpo.train import TrainConfig, train
from queries.db import connect
from refcache.cli import main as cli_main

FLAGS = ["--batch-size", "4", "--lr", "1e-4", "--probe-every", "0", "--probe-size", "8", "--threads", "1",
         "--no-progress"]
ARGS = ["--steps", "3", *FLAGS]


def _sql(cache, sql):
    return connect(caches=[cache]).execute(sql).fetchall()


def test_where_trains_exactly_the_kept_pairs(tmp_path, capsys, train_cache):
    cache = str(train_cache)
    where = "category <> 'near_identical' AND chosen_len <= 40"  # the input's own column, and a cache column
    kept = {r[0] for r in _sql(cache, f"SELECT pair_id FROM pairs WHERE {where}")}
    total = _sql(cache, "SELECT count(*) FROM pairs")[0][0]
    assert 0 < len(kept) < total - 20
    out = tmp_path / "run"
    steps = len(kept) // 4  # one epoch: every kept pair but len(kept) % 4 is trained on once
    assert cli_main(["train", "--cache", cache, "--out", str(out), "--where", where, "--steps", str(steps),
                     *FLAGS]) == 0
    printed = capsys.readouterr().out
    assert f"training on {len(kept)} of {total} pairs ({total - len(kept)} dropped)" in printed

    ex = pq.read_table(out / "examples").to_pandas()
    trained = ex[ex.source == "train"].pair_id
    assert set(trained) <= kept and len(set(trained)) == len(trained) == steps * 4
    assert set(ex[(ex.source == "probe") & (ex.split == "train")].pair_id) <= kept  # probes from the kept pairs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["where"] == where and cfg["train_pairs"] == len(kept)
    assert cfg["where_pairs"] == {"cache_pairs": total, "kept": len(kept), "dropped": total - len(kept),
                                  "pair_ids_sha256": hashlib.sha256("\n".join(sorted(kept)).encode()).hexdigest()}

    # a resume with another predicate is refused like any other changed setting
    err = one_line_error(capsys, ["train", "--cache", cache, "--out", str(out), "--where", "true", "--resume",
                                  *ARGS])
    assert "different settings" in err and "where" in err


def test_subset_pairs_equal_the_cache_rows(train_cache):
    """D.take keeps each pair's tokens and numbers: the subset's rows equal the full cache's rows."""
    full = D.load_pairs(str(train_cache))
    rows = np.array([5, 0, 17, len(full) - 1])
    sub = D.take(full, rows)
    for j, i in enumerate(rows):
        for side in ("prompt", "chosen", "rejected"):
            (v, o), (fv, fo) = getattr(sub, side), getattr(full, side)
            assert np.array_equal(v[o[j] : o[j + 1]], fv[fo[i] : fo[i + 1]])
    assert list(sub.pair_id) == list(full.pair_id[rows])
    assert np.array_equal(sub.ref_rejected_logp, full.ref_rejected_logp[rows])
    assert np.array_equal(sub.seq_len, full.seq_len[rows])


@pytest.mark.parametrize("where,message", [
    ("no_such_column > 1", 'Referenced column "no_such_column" not found'),
    ("chosen_len >", "syntax error"),
    ("chosen_len > 1; DROP TABLE x", "more than one statement"),
    ("chosen_len > 1, true", "only a single expression"),
    ("true) UNION ALL (SELECT 1", "syntax error"),
    ("chosen_len > 100000", "keeps none of the"),
    ("CAST(NULL AS DOUBLE) < 0.5", "it is NULL for"),  # as ln_ches in a cache without CHES
    ("  ", "must be an SQL predicate"),
])
def test_bad_predicates_are_one_line_errors(tmp_path, capsys, train_cache, where, message):
    out = tmp_path / "run"
    err = one_line_error(capsys, ["train", "--cache", str(train_cache), "--out", str(out), "--where", where, *ARGS])
    assert message in err, err
    assert not out.exists()


def test_fewer_kept_pairs_than_a_batch_says_what_to_pass(tmp_path, capsys, train_cache):
    where = "source_index < 3"
    err = one_line_error(capsys, ["train", "--cache", str(train_cache), "--out", str(tmp_path / "r"), "--where",
                                  where, *ARGS])
    assert "3 pairs (kept by --where) are fewer than --batch-size 4; pass --batch-size 3 or less" in err


def test_sweep_takes_where(tmp_path, capsys, train_cache):
    where = "category = 'arith'"
    assert cli_main(["sweep", "--cache", str(train_cache), "--out", str(tmp_path), "--beta", "0.1,0.2", "--where",
                     where, *ARGS]) == 0
    n = _sql(str(train_cache), f"SELECT count(*) FROM pairs WHERE {where}")[0][0]
    for name in ("sigmoid-beta0.1", "sigmoid-beta0.2"):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["where"] == where and cfg["train_pairs"] == n
    capsys.readouterr()
    # the same sweep without --where asks for other settings: refused before anything trains
    err = one_line_error(capsys, ["sweep", "--cache", str(train_cache), "--out", str(tmp_path), "--beta", "0.1,0.2",
                                  *ARGS])
    assert """other settings than asked (where: "category = 'arith'" then, None now)""" in err, err
    assert "(and 1 more of the 2 runs)" in err and "new --out" in err


def test_python_api_where(tmp_path, train_cache):
    s = train(TrainConfig(cache=str(train_cache), out=str(tmp_path / "r"), where="shared_prefix_len = 0", steps=2,
                          batch_size=4, probe_size=4, progress=False, threads=1, save_final=False))
    n = _sql(str(train_cache), "SELECT count(*) FROM pairs WHERE shared_prefix_len = 0")[0][0]
    assert s["train_pairs"] == n
