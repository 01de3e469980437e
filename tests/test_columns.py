"""The input's own columns in the cache (issue 12 point 3), the open layout (point 7) and cache schema 2, with
version-1 caches (built by the code at commit a7c9b19) still read by training, verify and the views.

Builds run in this process with one shared scorer (the tiny model); the training run is 8 steps."""

import csv
import datetime
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import queries
from dpo import data as D
from dpo import train as T
from pipeline import cache
from pipeline.cache import load_table, read_manifest
from pipeline.data import pair_id
from pipeline.precompute import format_summary, precompute
from pipeline.verify import verify
from refcache import UserError
from refcache.cli import main as cli_main
from refcache_base.cache_schema import CACHE_SCHEMA, part_schema

ROOT = Path(__file__).resolve().parents[1]
KW = {"backend": "hf", "dtype": "float32", "progress": False}
V1_COMMIT = "a7c9b19"  # main before schema 2: writes version-1 caches


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    from pipeline.backends import HFScorer

    return HFScorer(tiny_model_dir, "float32")


def build(data, model, out, scorer, **kw):
    return precompute(data, model, out, scorer=scorer, **{**KW, **kw})


def train_rows(prefs_dir, n):
    """The first n rows of the embedded train.jsonl (a category each; row 50 has chosen == rejected)."""
    return [json.loads(line) for line in (prefs_dir / "train.jsonl").read_text().splitlines()[:n]]


def by_index(table: pa.Table) -> dict:
    return {r["source_index"]: r for r in table.to_pylist()}


# ---------------------------------------------------------------- the type rule


def test_jsonl_columns_typed_by_one_rule_and_every_part_has_them(tmp_path, tiny_model_dir, scorer, prefs_dir):
    rows = train_rows(prefs_dir, 10)
    extra = [
        {"id": 0, "score": 1, "flag": True, "mixed": True, "cat": "a", "nothing": None, "meta": "m", "tags": ["x"],
         "pair_id": "mine-0", "Category": "A"},
        {"id": 1, "score": 2.5, "flag": False, "mixed": 3, "meta": {"k": 1}, "pair_id": "mine-1"},
        {"id": 2 ** 40, "score": None, "flag": None, "mixed": "s", "cat": "b"},
    ] + [{"id": i} for i in range(3, 9)] + [{"id": 9, "late": "only in the last part"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**r, **e}) + "\n" for r, e in zip(rows, extra)))
    out = tmp_path / "cache"
    s = build(data, tiny_model_dir, out, scorer, part_size=4)  # 3 parts; "late" is in the last one only
    m = read_manifest(out)
    assert m["extra_columns"] == [
        {"name": "category", "source": "category", "type": "string"},
        {"name": "id", "source": "id", "type": "int64"},
        {"name": "score", "source": "score", "type": "float64"},  # ints and floats
        {"name": "flag", "source": "flag", "type": "bool"},
        {"name": "mixed", "source": "mixed", "type": "string"},  # a boolean, a number and a string
        {"name": "cat", "source": "cat", "type": "string"},
        {"name": "nothing", "source": "nothing", "type": "string"},  # only nulls
        {"name": "input_pair_id", "source": "pair_id", "type": "string"},  # a cache column's name
        {"name": "input_Category", "source": "Category", "type": "string"},  # "category" (DuckDB: same name)
        {"name": "late", "source": "late", "type": "string"},
    ]
    assert m["skipped_columns"] == s["skipped_columns"] == {"meta": "lists or objects", "tags": "lists or objects"}
    text = format_summary(s)
    assert text.count("meta (lists or objects)") == 1 and "input columns not kept" in text
    assert "pair_id as input_pair_id (string)" in text

    schemas = [pq.read_schema(f) for f in sorted(out.glob("part-*.parquet"))]
    assert len(schemas) == 3 and all(s.equals(part_schema(m["extra_columns"])) for s in schemas)  # one for all
    got = by_index(load_table(out))
    assert got.keys() == set(range(10))
    assert [got[i]["id"] for i in range(10)] == [0, 1, 2 ** 40, 3, 4, 5, 6, 7, 8, 9]
    assert [got[i]["score"] for i in range(3)] == [1.0, 2.5, None]
    assert [got[i]["flag"] for i in range(3)] == [True, False, None]
    assert [got[i]["mixed"] for i in range(3)] == ["true", "3", "s"]  # JSON's spelling
    assert [got[i]["cat"] for i in range(4)] == ["a", None, "b", None]
    assert {got[i]["nothing"] for i in range(10)} == {None}
    assert [got[i]["input_pair_id"] for i in range(3)] == ["mine-0", "mine-1", None]
    assert got[0]["pair_id"] == pair_id(rows[0]["prompt"], rows[0]["chosen"], rows[0]["rejected"])  # ours
    assert [got[i]["late"] for i in range(10)] == [None] * 9 + ["only in the last part"]
    assert [got[i]["category"] for i in range(10)] == [r["category"] for r in rows]
    # the glob reads as one table because every part has every column
    assert pl.read_parquet(out / "part-*.parquet").sort("source_index")["late"].to_list()[-1] == "only in the last part"


def write_csv(path, rows, extra_cols, header=("prompt", "chosen", "rejected")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["prompt", "chosen", "rejected"] + list(extra_cols[0])
        w.writerow([*header, *cols[3:]])
        for r, e in zip(rows, extra_cols):
            w.writerow([json.dumps(r[c]) if isinstance(r[c], list) else r[c] for c in cols[:3]] + list(e.values()))


def test_csv_cells_typed_by_the_prescan(tmp_path, tiny_model_dir, scorer, prefs_dir):
    rows = train_rows(prefs_dir, 6)
    extra = [{"category": r["category"], "n": str(i), "score": ["1.5", "2", "", "-3e2", "0", "7"][i],
              "zip": ["007", "12", "13", "14", "15", "16"][i], "ok": ["TRUE", "false", "", "True", "false", "FALSE"][i],
              "note": ["", "x", "", "y", "", "z"][i]} for i, r in enumerate(rows)]
    data = tmp_path / "pairs.csv"
    write_csv(data, rows, extra, header=("question", "good", "bad"))  # mapped columns are not kept twice
    out = tmp_path / "cache"
    build(data, tiny_model_dir, out, scorer, part_size=4,
          columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    types = {c["name"]: c["type"] for c in read_manifest(out)["extra_columns"]}
    assert types == {"category": "string", "n": "int64", "score": "float64", "zip": "string", "ok": "bool",
                     "note": "string"}
    got = by_index(load_table(out))
    assert [got[i]["n"] for i in range(6)] == list(range(6))
    assert [got[i]["score"] for i in range(6)] == [1.5, 2.0, None, -300.0, 0.0, 7.0]  # empty cell: null
    assert got[0]["zip"] == "007"  # a leading zero stays text
    assert [got[i]["ok"] for i in range(6)] == [True, False, None, True, False, False]
    assert [got[i]["note"] for i in range(3)] == ["", "x", ""]  # a text column keeps the empty string


def test_parquet_and_saved_dataset_columns_typed_from_their_schema(tmp_path, tiny_model_dir, scorer, prefs_dir):
    rows = [r for r in train_rows(prefs_dir, 30) if isinstance(r["prompt"], str)][:6]
    n = len(rows)
    when = [datetime.datetime(2024, 1, 1 + i) for i in range(n)]
    t = pa.table({
        "prompt": [r["prompt"] for r in rows], "chosen": [r["chosen"] for r in rows],
        "rejected": [r["rejected"] for r in rows],
        "category": pa.array([r["category"] for r in rows]).dictionary_encode(),
        "id": pa.array(range(n), pa.int32()), "score": pa.array([0.5 * i for i in range(n)], pa.float32()),
        "flag": [i % 2 == 0 for i in range(n)], "when": pa.array(when, pa.timestamp("s")),
        "big": pa.array([2 ** 64 - 1 - i for i in range(n)], pa.uint64()), "blob": [b"\x00"] * n,
        "tags": [["a"]] * n, "empty": pa.nulls(n), "Cache": ["mine"] * n,
    })
    data = tmp_path / "pairs.parquet"
    pq.write_table(t, data)
    out = tmp_path / "cache"
    build(data, tiny_model_dir, out, scorer, part_size=4)
    m = read_manifest(out)
    assert [(c["name"], c["type"]) for c in m["extra_columns"]] == [
        ("category", "string"), ("id", "int64"), ("score", "float64"), ("flag", "bool"), ("when", "string"),
        ("big", "string"), ("empty", "string"), ("input_Cache", "string")]
    assert m["skipped_columns"] == {"blob": "binary values", "tags": "lists or objects"}
    got = by_index(load_table(out))
    assert [got[i]["category"] for i in range(n)] == [r["category"] for r in rows]
    assert [got[i]["score"] for i in range(n)] == [0.5 * i for i in range(n)]
    assert got[1]["when"] == str(when[1]) and got[0]["big"] == str(2 ** 64 - 1)  # exact, as text
    con = queries.connect(caches=[out])
    counts = dict(con.sql("SELECT category, count(*) FROM pairs GROUP BY category").fetchall())
    assert counts == {c: sum(r["category"] == c for r in rows) for c in {r["category"] for r in rows}}

    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset(t.drop(["blob"])).save_to_disk(str(saved))
    out2 = tmp_path / "cache2"
    build(saved, tiny_model_dir, out2, scorer)
    m2 = read_manifest(out2)
    assert m2["extra_columns"] == m["extra_columns"] and m2["skipped_columns"] == {"tags": "lists or objects"}
    assert load_table(out2).drop(["ches", "ln_ches"]).equals(load_table(out).drop(["ches", "ln_ches"]))


def test_ultrafeedback_keeps_prompt_id_and_scores(tmp_path, tiny_model_dir, scorer):
    data = ROOT / "data" / "prefs" / "real" / "ultrafeedback.jsonl"
    out = tmp_path / "cache"
    s = build(data, tiny_model_dir, out, scorer)
    m = read_manifest(out)
    assert m["extra_columns"] == [{"name": "prompt_id", "source": "prompt_id", "type": "string"},
                                  {"name": "score_chosen", "source": "score_chosen", "type": "float64"},
                                  {"name": "score_rejected", "source": "score_rejected", "type": "float64"}]
    assert m["skipped_columns"] == {"messages": "lists or objects"}
    assert "messages (lists or objects)" in format_summary(s)
    src = [json.loads(line) for line in data.read_text().splitlines()]
    got = by_index(load_table(out))
    assert len(got) == m["dataset"]["rows_kept"] > 0
    for i, r in got.items():
        assert (r["prompt_id"], r["score_chosen"], r["score_rejected"]) == \
            (src[i]["prompt_id"], src[i]["score_chosen"], src[i]["score_rejected"])
    con = queries.connect(caches=[out])
    gap = con.sql("SELECT avg(score_chosen - score_rejected) FROM pairs").fetchall()[0][0]
    assert gap == pytest.approx(sum(src[i]["score_chosen"] - src[i]["score_rejected"] for i in got) / len(got))


# ---------------------------------------------------------------- end to end: cache -> run -> SQL -> slices


@pytest.fixture(scope="module")
def csv_input(tmp_path_factory, prefs_dir):
    """51 rows of train.jsonl as CSV with their category and a numeric score (row 50: chosen == rejected)."""
    rows = train_rows(prefs_dir, 51)
    path = tmp_path_factory.mktemp("e2e") / "pairs.csv"
    write_csv(path, rows, [{"category": r["category"], "score": str(i % 5)} for i, r in enumerate(rows)])
    return path, rows


@pytest.fixture(scope="module")
def csv_cache(tmp_path_factory, csv_input, tiny_model_dir, scorer):
    out = tmp_path_factory.mktemp("e2e") / "cache"
    build(csv_input[0], tiny_model_dir, out, scorer, part_size=16)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, csv_cache):
    out = tmp_path_factory.mktemp("e2e") / "run"
    T.train(T.TrainConfig(cache=str(csv_cache), out=str(out), loss="sigmoid", beta=0.1, steps=8, batch_size=4,
                          probe_every=4, probe_size=32, lr=5e-4, seed=0, checkpoint_every=0, save_final=False,
                          progress=False))
    return out


def input_categories(rows) -> dict:
    """{pair_id: category}, from the input file alone (the join key computed as stage 1 defines it)."""
    return {pair_id(r.get("prompt"), r["chosen"], r["rejected"]): r["category"] for r in rows}


def test_sql_joins_run_examples_with_the_inputs_category(run, csv_input, capsys):
    sql = ("SELECT category, avg(margin) AS margin, count(*) AS n FROM examples JOIN pairs USING (pair_id) "
           "WHERE source = 'probe' AND step = 8 GROUP BY category ORDER BY category")
    assert cli_main(["sql", sql, "--run", str(run), "--format", "csv"]) == 0
    got = pl.read_csv(io.StringIO(capsys.readouterr().out))
    ex = pl.read_parquet(run / "examples" / "*.parquet").filter((pl.col("source") == "probe") & (pl.col("step") == 8))
    cats = input_categories(csv_input[1])
    want = (ex.with_columns(category=pl.col("pair_id").replace_strict(cats))
            .group_by("category").agg(margin=pl.col("margin").mean(), n=pl.len()).sort("category"))
    assert got["category"].to_list() == want["category"].to_list() and len(want) >= 3
    assert got["n"].to_list() == want["n"].to_list() and sum(want["n"]) == 32
    assert got["margin"].to_list() == pytest.approx(want["margin"].to_list(), rel=1e-9, abs=1e-12)


def test_slices_by_category_match_the_probe_rows_and_displacement(run, csv_input):
    con = queries.connect([run])
    got = queries.run_query(con, "slices", {"by": "category"})
    cats = input_categories(csv_input[1])
    ex = (pl.read_parquet(run / "examples" / "*.parquet").filter((pl.col("source") == "probe") & (pl.col("step") == 8))
          .with_columns(category=pl.col("pair_id").replace_strict(cats),
                        dc=pl.col("policy_chosen_logp") - pl.col("ref_chosen_logp")))
    want = ex.group_by("category").agg(n=pl.len(), dc=pl.col("dc").mean(),
                                       acc=(pl.col("margin") > 0).mean()).sort("category")
    assert got["slice"].to_list() == want["category"].to_list()
    assert got["n_pairs"].to_list() == want["n"].to_list()
    assert got["chosen_drift_mean"].to_list() == pytest.approx(want["dc"].to_list(), rel=1e-9, abs=1e-12)
    assert got["accuracy"].to_list() == pytest.approx(want["acc"].to_list())
    # displaced per category = the `displacement` diagnostic's pairs, counted by the input's category
    disp = queries.run_query(con, "displacement", {"limit": 1000, "min_margin_gain": 0.0})
    per_cat = {c: sum(cats[p] == c for p in disp["pair_id"].to_list()) for c in want["category"].to_list()}
    assert dict(zip(got["slice"].to_list(), got["displaced"].to_list())) == per_cat
    assert got["run_share"].to_list() == pytest.approx([disp.height / 32] * got.height)
    for r in got.iter_rows(named=True):
        assert r["displaced_low"] <= r["displaced_share"] <= r["displaced_high"]
        assert r["stands_out"] == (not r["displaced_low"] <= r["run_share"] <= r["displaced_high"])
    assert got["ln_ches_mean"].null_count() == 0  # the hf backend computes CHES

    binned = queries.run_query(con, "slices", {"by": "score", "bins": 2})
    assert binned["n_pairs"].sum() == 32 and binned.height == 2
    assert binned["slice"].str.starts_with("q1 [").to_list() == [True, False]


def test_slices_refuses_a_column_the_pairs_view_lacks(run, capsys):
    con = queries.connect([run])
    with pytest.raises(UserError, match=r"no column 'nope' in the pairs view; the input's own columns: "
                                        r"category, score; other columns: cache, pair_id"):
        queries.run_query(con, "slices", {"by": "nope"})
    with pytest.raises(UserError, match="no column"):  # never pasted into the SQL unchecked
        queries.run_query(con, "slices", {"by": 'category" FROM pairs; --'})
    assert queries.run_query(con, "slices", {"by": "CATEGORY"}).height >= 3  # DuckDB's case rule
    assert cli_main(["query", "slices", "--run", str(run), "--param", "by=category", "--format", "csv"]) == 0
    assert "near_identical" in capsys.readouterr().out


# ---------------------------------------------------------------- open layout


def test_the_cache_globs_as_parquet_for_polars_duckdb_and_datasets(csv_cache, tmp_path):
    m = read_manifest(csv_cache)
    assert m["dataset"]["rows_rejected"] == 1  # row 50; its reason is out of the glob
    assert sorted(p.name for p in csv_cache.iterdir() if p.suffix == ".parquet") == [s["file"] for s in m["shards"]]
    kept = sorted(load_table(csv_cache, ["pair_id"]).column("pair_id").to_pylist())
    assert len(kept) == m["dataset"]["rows_kept"]
    glob = str(csv_cache / "*.parquet")

    df = pl.read_parquet(glob)
    assert sorted(df["pair_id"].to_list()) == kept and "category" in df.columns
    assert duckdb.sql(f"SELECT count(*) FROM '{glob}'").fetchall()[0][0] == len(kept)
    assert sorted(r[0] for r in duckdb.sql(f"SELECT pair_id FROM '{glob}'").fetchall()) == kept

    import datasets

    ds = datasets.load_dataset("parquet", data_files=glob, cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train"] and sorted(ds["train"]["pair_id"]) == kept
    # with data_dir, `datasets` reads every file it finds except in dot and "__" folders: __refcache__/ (manifest,
    # rejected rows, bookkeeping) is skipped, so the directory itself is the dataset; so is it for pyarrow.dataset
    ds = datasets.load_dataset("parquet", data_dir=str(csv_cache), cache_dir=str(tmp_path / "hf"))
    assert list(ds) == ["train"] and sorted(ds["train"]["pair_id"]) == kept
    import pyarrow.dataset

    assert sorted(pyarrow.dataset.dataset(csv_cache).to_table(columns=["pair_id"])["pair_id"].to_pylist()) == kept


# ---------------------------------------------------------------- schema version 1


@pytest.fixture(scope="module")
def v1_cache(tmp_path_factory, prefs_dir, tiny_model_dir):
    """A cache built by refcache at commit a7c9b19 (schema version 1: rejected_rows.parquet and bookkeeping at
    the top level, no ches/ln_ches), in a subprocess running that commit's code (all four packages)."""
    tmp = tmp_path_factory.mktemp("v1")
    src = tmp / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", V1_COMMIT, "pipeline", "refcache", "dpo", "queries"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.skip(f"commit {V1_COMMIT} is not in this checkout's history: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    assert "SCHEMA_VERSION = 1" in (src / "pipeline" / "schema.py").read_text()
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_rows(prefs_dir, 51)[39:]))  # row 50 rejected
    out = tmp / "cache"
    r = subprocess.run([sys.executable, "-m", "refcache.cli", "precompute", str(data), "--model", str(tiny_model_dir),
                        "--out", str(out), "--backend", "hf", "--part-size", "4", "--no-progress"],
                       cwd=tmp, env={**os.environ, "PYTHONPATH": str(src)},
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    return out


def test_a_version_1_cache_reads_in_training_verify_and_the_views(v1_cache, tmp_path, tiny_model_dir, scorer):
    m = read_manifest(v1_cache)
    assert m["schema_version"] == 1 and (v1_cache / "rejected_rows.parquet").exists()
    t = load_table(v1_cache)
    assert t.schema.equals(CACHE_SCHEMA) and t.num_rows == m["dataset"]["rows_kept"] == 11
    assert t.column("ches").null_count == t.column("ln_ches").null_count == t.num_rows
    assert D.load_pairs(str(v1_cache)).pair_id.tolist() == t.column("pair_id").to_pylist()

    res = verify(v1_cache, sample=4, scorer=scorer)
    assert res["max_abs_diff"] < 1e-4
    assert not (v1_cache / cache.SIDE).exists()  # a version-1 cache keeps its layout (verify's memo: top level)

    run = tmp_path / "run"
    T.train(T.TrainConfig(cache=str(v1_cache), out=str(run), steps=2, batch_size=4, probe_every=1, probe_size=4,
                          lr=1e-4, checkpoint_every=0, save_final=False, progress=False))
    steps = pl.read_parquet(run / "steps.parquet")
    assert steps["loss"][0] == pytest.approx(math.log(2), abs=1e-5)
    con = queries.connect([run])  # the cache found through the run's config
    assert con.sql("SELECT count(*), count(ches), count(ln_ches) FROM pairs").fetchall() == [(11, 0, 0)]
    assert con.sql("SELECT source_index, reason FROM rejected_rows").fetchall() == \
        [(11, "chosen and rejected are identical")]
    joined = "SELECT count(*) FROM examples JOIN pairs USING (pair_id) WHERE step = 0 AND source = 'probe'"
    assert con.sql(joined).fetchall() == [(4,)]
    assert queries.run_query(con, "drift").height > 0
    # no CHES in a version-1 cache: displacement_risk says so in one line, displacement_prediction in its note
    with pytest.raises(UserError, match="no CHES in this cache: built before refcache computed CHES "
                                                 r"\(cache schema 1\); rebuild with --backend hf"):
        queries.run_query(con, "displacement_risk")
    pred = queries.run_query(con, "displacement_prediction").filter(pl.col("predictor") == "ln_ches")
    assert pred.height == 2 and pred["estimate"].null_count() == 2 and pred["note"].str.contains("schema 1").all()


def test_merge_keeps_a_version_1_cache_at_version_1(v1_cache, tmp_path, capsys):
    out = tmp_path / "v1"
    shutil.copytree(v1_cache, out)
    before = load_table(out)
    old = read_manifest(out)
    assert cli_main(["merge", str(out)]) == 0, capsys.readouterr().err  # an old cache's parts, merged anew
    m = read_manifest(out)
    assert m["schema_version"] == 1 and m["rejected_rows"]["file"] == "rejected_rows.parquet"
    assert "extra_columns" not in m and not (out / cache.SIDE).exists()
    assert m["shards"] != old["shards"]  # rewritten: it now records each part's bytes too
    assert load_table(out).equals(before)
    assert queries.connect(caches=[out]).sql("SELECT count(*) FROM rejected_rows").fetchall() == [(1,)]


def test_a_version_1_cache_is_not_resumed_and_a_newer_one_is_refused(v1_cache, tmp_path, tiny_model_dir, scorer):
    out = tmp_path / "v1"
    shutil.copytree(v1_cache, out)
    data = v1_cache.parent / "pairs.jsonl"  # the input it was built from
    with pytest.raises(UserError, match="schema_version"):
        build(data, tiny_model_dir, out, scorer, part_size=4)
    m = json.loads((out / "manifest.json").read_text())  # a version-1 cache: at the top level
    m["schema_version"] = 3
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"schema_version 3, this refcache reads versions 1, 2; a newer refcache"):
        load_table(out)
