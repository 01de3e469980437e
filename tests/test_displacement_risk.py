"""Stage 3 on CHES: `displacement_risk` ranks a fresh hf cache by ln-CHES (no run needed) and says in one line
why a cache without CHES cannot be ranked; `displacement_prediction` over a short real run equals the same
figures computed directly with numpy/Polars from the Parquet files."""

import math

import numpy as np
import polars as pl
import pytest
from oracles import levenshtein

import queries
from pipeline.cache import load_table
from refcache import UserError

TOP = 10



def test_displacement_risk_ranks_a_fresh_cache(train_cache):
    got = queries.run_query(queries.connect(caches=[train_cache]), "displacement_risk", {"limit": 20})
    t = pl.from_arrow(load_table(train_cache)).sort(["ln_ches", "pair_id"], descending=[True, False])
    assert t["ln_ches"].null_count() == 0
    want = t.head(20)
    assert got["rank"].to_list() == list(range(1, 21))
    assert got["pair_id"].to_list() == want["pair_id"].to_list()
    assert got["ln_ches"].to_list() == want["ln_ches"].to_list() and got["ches"].to_list() == want["ches"].to_list()
    assert got["top_share"].to_list() == pytest.approx([k / t.height for k in range(1, 21)])
    for g, w in zip(got.iter_rows(named=True), want.iter_rows(named=True)):
        d = levenshtein(w["chosen_ids"], w["rejected_ids"])
        rel = d / max(w["chosen_len"], w["rejected_len"])
        assert (g["edit_distance"], g["near_identical"]) == (d, rel <= 0.1)
        assert g["rel_edit"] == pytest.approx(rel)
        assert (g["chosen_len"], g["rejected_len"], g["length_diff"]) == \
            (w["chosen_len"], w["rejected_len"], w["chosen_len"] - w["rejected_len"])


def test_displacement_risk_without_ches_is_one_line(tmp_path):
    from synth import make_world

    world = make_world(tmp_path)  # a schema-2 cache whose backend wrote no CHES
    with pytest.raises(UserError, match="needs CHES scores: .*no CHES in this cache: built with the synthetic "
                                        "backend; rebuild with --backend hf$"):
        queries.run_query(queries.connect(caches=[world["cache"]]), "displacement_risk")


@pytest.fixture(scope="module")
def small_run(train_cache, eval_cache, tmp_path_factory):
    from dpo.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ches_run") / "run"
    train(TrainConfig(cache=str(train_cache), eval_cache=str(eval_cache), out=str(out), loss="sigmoid", beta=0.1,
                      steps=8, batch_size=4, probe_every=4, probe_size=32, lr=5e-4, seed=0, checkpoint_every=0,
                      save_final=False, progress=False))
    return out


def _avg_rank(x) -> np.ndarray:
    return pl.Series(x).rank("average").to_numpy()


def _direct(run, caches):
    """Each predictor's Spearman rho and precision at TOP, from the Parquet files (last probe step)."""
    ex = pl.read_parquet(run / "examples" / "*.parquet").filter(pl.col("source") == "probe")
    s0 = ex.filter(pl.col("step") == 0)
    drift_noise = max((s0["policy_chosen_logp"] - s0["ref_chosen_logp"]).abs().max(),
                      (s0["policy_rejected_logp"] - s0["ref_rejected_logp"]).abs().max())
    margin_noise = s0["margin"].abs().max()
    first = ex.filter(pl.col("step") == ex["step"].min()).select("split", "pair_id", first_margin="margin")
    last = ex.filter(pl.col("step") == ex["step"].max()).join(first, on=["split", "pair_id"])
    cache = pl.concat([pl.from_arrow(load_table(c)).select("pair_id", "ln_ches", "chosen_ids", "rejected_ids")
                       for c in caches])
    p = last.join(cache, on="pair_id").with_columns(
        drift=pl.col("policy_chosen_logp") - pl.col("ref_chosen_logp"))
    drop = np.where(p["drift"].abs() <= drift_noise, 0.0, -p["drift"].to_numpy())
    rel = np.array([levenshtein(a, b) / max(len(a), len(b)) for a, b in zip(p["chosen_ids"], p["rejected_ids"])])
    displaced = p.filter((pl.col("drift") < -drift_noise) & (pl.col("margin") - pl.col("first_margin") > margin_noise))
    top = set(zip(*displaced.sort(["drift", "pair_id"]).head(TOP).select("split", "pair_id")))
    keys = list(zip(p["split"], p["pair_id"]))
    out = {}
    for name, risk in (("ln_ches", p["ln_ches"].to_numpy()), ("rel_edit", -rel)):
        rho = np.corrcoef(_avg_rank(risk), _avg_rank(drop))[0, 1]
        picks = sorted(range(len(keys)), key=lambda i: (-risk[i], keys[i][1]))[:TOP]
        out[name] = {"spearman": rho, "precision_at_top": sum(keys[i] in top for i in picks) / TOP,
                     "null": len(top) / len(keys), "n": len(keys)}
    return out


def test_displacement_prediction_matches_numpy(small_run, train_cache, eval_cache):
    con = queries.connect([small_run])
    got = queries.run_query(con, "displacement_prediction", {"top": TOP})
    want = _direct(small_run, [train_cache, eval_cache])
    assert got.height == 4 and got["note"].null_count() == 4  # both caches have CHES
    for r in got.iter_rows(named=True):
        w = want[r["predictor"]]
        assert r["estimate"] == pytest.approx(w[r["metric"]], abs=1e-12), (r["predictor"], r["metric"])
        if r["metric"] == "spearman":
            assert r["n"] == w["n"] and r["null_value"] == 0
            se = math.sqrt(1.06 / (w["n"] - 3))
            assert r["ci_low"] == pytest.approx(math.tanh(math.atanh(w["spearman"]) - 1.96 * se))
            assert r["p_value"] == pytest.approx(math.erfc(abs(math.atanh(w["spearman"])) / se / math.sqrt(2)),
                                                 abs=2e-7)
        else:
            assert r["n"] == TOP and r["null_value"] == pytest.approx(w["null"])
            assert r["ci_low"] <= r["estimate"] <= r["ci_high"]
    # Holm: a row is above noise only if its p-value passes at its rank, and so do all smaller ones
    ps = sorted(p for p in got["p_value"].to_list())
    passed = [all(ps[j] <= 0.05 / (len(ps) - j) for j in range(k + 1)) for k in range(len(ps))]
    assert sorted(got.filter(pl.col("above_noise"))["p_value"].to_list()) == \
        [p for p, ok in zip(ps, passed) if ok]
    # displacement lists each displaced pair's ln_ches and its standing in its cache (view risk)
    disp = queries.run_query(con, "displacement", {"limit": 1000})
    risk = dict(con.sql("SELECT pair_id, ln_ches FROM risk").fetchall())
    assert disp["ln_ches"].to_list() == [risk[p] for p in disp["pair_id"].to_list()]
    assert disp["risk_share"].is_between(0, 1).all()

