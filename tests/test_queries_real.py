"""The diagnostics on a real short stage-2 run over real stage-1 caches of the embedded tiny model: the SQL
numbers equal Polars over the same Parquet logs, step 0 is the reference, and the report decodes pair text
with the real tokenizer."""

import math

import polars as pl
import pytest
from oracles import levenshtein

import queries
from queries.report import ches_points, write_report

train_mod = pytest.importorskip("dpo.train", reason="stage 2 (dpo.train) not built yet")


def _train(train_cache, eval_cache, out, lr, probe_size=32):
    train_mod.train(train_mod.TrainConfig(
        cache=str(train_cache), eval_cache=str(eval_cache), out=str(out), loss="sigmoid", beta=0.1, steps=8,
        batch_size=4, probe_every=4, probe_size=probe_size, lr=lr, seed=0, checkpoint_every=0, save_final=False,
        progress=False))
    return out


@pytest.fixture(scope="module")
def real_run(request, tmp_path_factory):
    try:
        train_cache = request.getfixturevalue("train_cache")
        eval_cache = request.getfixturevalue("eval_cache")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no train_cache/eval_cache fixtures yet")
    out = _train(train_cache, eval_cache, tmp_path_factory.mktemp("realrun") / "run", lr=5e-4)
    return {"run": out, "cache": train_cache, "eval_cache": eval_cache}


def test_real_run_views_and_drift_parity(real_run):
    con = queries.connect([real_run["run"]])  # caches found through the run's config.json
    assert queries.db.view_sources(con)["pairs"] >= 1
    ex = pl.read_parquet(real_run["run"] / "examples" / "*.parquet")
    assert con.sql("SELECT count(*) FROM examples").fetchall()[0][0] == ex.height
    p = ex.filter(pl.col("source") == "probe").with_columns(
        dc=pl.col("policy_chosen_logp") - pl.col("ref_chosen_logp"),
        dr=pl.col("policy_rejected_logp") - pl.col("ref_rejected_logp"))
    assert p.height > 0
    want = p.group_by("split", "step").agg(
        chosen_drift_mean=pl.col("dc").mean(), chosen_drift_p50=pl.col("dc").quantile(0.5, "linear"),
        rejected_drift_p90=pl.col("dr").quantile(0.9, "linear"), accuracy=(pl.col("margin") > 0).mean(),
        both_down_share=((pl.col("dc") < -1e-3) & (pl.col("dr") < -1e-3)).mean()).sort("split", "step")
    got = queries.run_query(con, "drift").sort("split", "step")
    for c in want.columns[2:]:
        assert got[c].to_list() == pytest.approx(want[c].to_list(), rel=1e-9, abs=1e-12), c
    # step 0 probes are scored with the initial weights = the reference: no drift, loss ln 2
    s0 = got.filter(pl.col("step") == 0)
    assert s0.height >= 1
    assert s0["chosen_drift_mean"].abs().max() < 1e-3 and s0["rejected_drift_mean"].abs().max() < 1e-3
    assert s0["loss_mean"].to_list() == pytest.approx([math.log(2)] * s0.height, abs=1e-4)


def test_real_run_every_diagnostic_answers(real_run, tmp_path):
    con = queries.connect([real_run["run"]])
    for q in queries.list_queries():
        df = queries.run_query(con, q.name)
        if q.name not in ("collapse", "displacement"):  # these may legitimately be empty on 8 steps
            assert df.height > 0, q.name
    disp = queries.run_query(con, "displacement", {"min_margin_gain": -1e9})
    assert disp["shared_prefix_len"].null_count() == 0  # every probe pair found in the caches
    page = write_report([real_run["run"]], out_dir=tmp_path / "rep").read_text()
    assert "decoded with the cache's tokenizer" in page
    # ln-CHES against the chosen drop: every probe pair at the last probe step, drops as the examples log has them
    assert "alt='ches_vs_drop.png'" in page and (tmp_path / "rep" / "ches_vs_drop.png").stat().st_size > 10_000
    pts = ches_points(con)
    ex = pl.read_parquet(real_run["run"] / "examples" / "*.parquet").filter(pl.col("source") == "probe")
    last = ex.filter(pl.col("step") == ex["step"].max())
    assert pts.height == last.height > 0 and pts["ln_ches"].null_count() == 0
    both = pts.join(last, on=["split", "pair_id"])
    assert both.height == pts.height
    want = both["ref_chosen_logp"] - both["policy_chosen_logp"]
    assert (both["chosen_drop"] - want).abs().max() < 1e-12



def test_near_identical_base_rate_on_embedded_data(real_run):
    """The near-identical rule (relative token edit distance <= 0.1) on the embedded pairs: the SQL macro
    agrees with a plain edit distance, and its base rate is far below the old prefix rule's."""
    con = queries.connect([real_run["run"]])
    got = con.sql("SELECT cache, avg(near_identical(chosen_ids, rejected_ids)::INT) FROM pairs GROUP BY cache "
                  "ORDER BY cache").fetchall()
    for cache, rate in got:
        p = pl.read_parquet(real_run[{"train": "cache", "eval": "eval_cache"}[cache]] / "part-*.parquet")
        rel = [levenshtein(a, b) / max(len(a), len(b)) for a, b in zip(p["chosen_ids"], p["rejected_ids"])]
        assert rate == pytest.approx(sum(r <= 0.1 for r in rel) / len(rel))
        shorter = p.select(pl.min_horizontal("chosen_len", "rejected_len")).to_series()
        longer = p.select(pl.max_horizontal("chosen_len", "rejected_len")).to_series()
        old = ((p["shared_prefix_len"] >= 0.5 * shorter) | (longer - p["shared_prefix_len"] <= 3)).mean()
        assert rate < 0.3 and old > 0.7, (cache, rate, old)


def test_noise_rule_on_real_runs(real_run, tmp_path):
    """A real run that learns shows effects above noise; one whose policy never moves (lr 0: every probe is
    the reference up to float rounding) shows none, and its findings say so."""
    eff = queries.run_query(queries.connect([real_run["run"]]), "effects")
    assert eff.filter(pl.col("metric").str.ends_with("drift_mean"))["above_noise"].any()
    still = _train(real_run["cache"], real_run["eval_cache"], tmp_path / "still", lr=0.0)
    con = queries.connect([still])
    eff = queries.run_query(con, "effects")
    assert eff.height >= 8 and not eff["above_noise"].any()
    lines = queries.findings(con)
    assert len(lines) == 1 and "nothing is above noise" in lines[0]
    assert queries.run_query(con, "length").filter(pl.col("corr_summed").is_not_null()).is_empty()
