"""Each named diagnostic's SQL result equals the same numbers computed independently with Polars from the
Parquet logs, on synthetic logs (queries/synth.py) whose structure is known."""

import math

import polars as pl
import pytest

import queries
from queries.synth import make_world

TOL = 1e-9


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    # two runs over one train cache + one eval cache; the second has another probe cadence and length
    w = make_world(root, runs=(("beta0.1", 0.1), ("beta0.5", 0.5)), steps=120, probe_every=10, n_probe=24,
                   steps_per_file=37)
    w["con"] = queries.connect(w["runs"])
    return w


def examples_pl(w) -> pl.DataFrame:
    """All example rows, read with Polars straight from the Parquet parts, plus `run` = dir name."""
    return pl.concat([pl.read_parquet(r / "examples" / "*.parquet").with_columns(run=pl.lit(r.name))
                      for r in w["runs"]])


def steps_pl(w) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(r / "steps.parquet").with_columns(run=pl.lit(r.name)) for r in w["runs"]])


def pairs_pl(w) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(w[c] / "part-*.parquet").with_columns(cache=pl.lit(w[c].name))
                      for c in ("cache", "eval_cache")])


def probes(w) -> pl.DataFrame:
    return examples_pl(w).filter(pl.col("source") == "probe").with_columns(
        dc=pl.col("policy_chosen_logp") - pl.col("ref_chosen_logp"),
        dr=pl.col("policy_rejected_logp") - pl.col("ref_rejected_logp"))


def assert_frames_close(got: pl.DataFrame, want: pl.DataFrame, keys):
    assert got.height == want.height > 0
    got, want = got.sort(keys), want.sort(keys)
    for c in want.columns:
        g, e = got[c].to_list(), want[c].to_list()
        for i, (a, b) in enumerate(zip(g, e)):
            if isinstance(b, float) and (b is None or a is None or math.isnan(b)):
                assert (a is None or math.isnan(a)) == (b is None or math.isnan(b)), (c, i, a, b)
            elif isinstance(b, float):
                assert a == pytest.approx(b, rel=1e-9, abs=TOL), (c, i, a, b)
            else:
                assert a == b, (c, i, a, b)


def test_views_and_runs_table(world):
    con = world["con"]
    assert con.sql("SELECT count(*) FROM examples").fetchall()[0][0] == examples_pl(world).height
    assert con.sql("SELECT count(*) FROM steps").fetchall()[0][0] == steps_pl(world).height
    assert con.sql("SELECT count(*) FROM pairs").fetchall()[0][0] == pairs_pl(world).height
    got = con.sql("SELECT cache, pair_id, length_diff FROM pairs").pl()
    want = pairs_pl(world).select("cache", "pair_id", length_diff=pl.col("chosen_len") - pl.col("rejected_len"))
    assert_frames_close(got, want, ["cache", "pair_id"])
    runs = con.sql("SELECT run, loss, beta, steps, cache FROM runs ORDER BY run").pl()
    assert runs["run"].to_list() == ["beta0.1", "beta0.5"]
    assert runs["beta"].to_list() == [0.1, 0.5]
    assert runs["cache"].to_list() == [str(world["cache"])] * 2  # caches found through config.json
    assert con.sql("SELECT count(*) FROM rejected_rows").fetchall()[0][0] == 5 + 2


def test_drift_matches_polars(world):
    tol = 0.05
    got = queries.run_query(world["con"], "drift", {"tol": tol})
    p = probes(world)
    q = lambda col, x: pl.col(col).quantile(x, interpolation="linear")
    want = p.group_by("run", "split", "step").agg(
        n_pairs=pl.len(),
        chosen_drift_mean=pl.col("dc").mean(), chosen_drift_p10=q("dc", 0.1), chosen_drift_p50=q("dc", 0.5),
        chosen_drift_p90=q("dc", 0.9),
        rejected_drift_mean=pl.col("dr").mean(), rejected_drift_p10=q("dr", 0.1),
        rejected_drift_p50=q("dr", 0.5), rejected_drift_p90=q("dr", 0.9),
        both_down_share=((pl.col("dc") < -tol) & (pl.col("dr") < -tol)).mean(),
        chosen_down_share=(pl.col("dc") < -tol).mean(), chosen_up_share=(pl.col("dc") > tol).mean(),
        margin_mean=pl.col("margin").mean(), accuracy=(pl.col("margin") > 0).mean(), loss_mean=pl.col("loss").mean(),
    )
    assert_frames_close(got, want.with_columns(pl.col("n_pairs").cast(pl.Int64)), ["run", "split", "step"])
    # known structure: step 0 is the reference itself, later the chosen log-prob falls on most pairs
    s0 = got.filter(pl.col("step") == 0)
    assert s0["chosen_drift_mean"].abs().max() == 0 and s0["loss_mean"].to_list() == [pytest.approx(math.log(2))] * 4
    last = got.filter(pl.col("step") == 120)
    assert last["chosen_down_share"].min() > 0.9 and last["accuracy"].min() > 0.9


def test_displacement_matches_polars(world):
    limit = 7
    got = queries.run_query(world["con"], "displacement", {"limit": limit, "split": "all"})
    p = probes(world)
    bounds = p.group_by("run").agg(first=pl.col("step").min(), last=pl.col("step").max())
    now = p.join(bounds, on="run").filter(pl.col("step") == pl.col("last"))
    first = p.join(bounds, on="run").filter(pl.col("step") == pl.col("first")).select(
        "run", "split", "pair_id", m0="margin")
    pairs = pairs_pl(world).unique("pair_id").select("pair_id", "shared_prefix_len", "chosen_len", "rejected_len")
    want = (now.join(first, on=["run", "split", "pair_id"])
            .with_columns(margin_gain=pl.col("margin") - pl.col("m0"))
            .filter((pl.col("dc") < 0) & (pl.col("margin_gain") > 0))
            .sort("run", "dc", "pair_id")
            .group_by("run", maintain_order=True).head(limit)
            .with_columns(rank=pl.int_range(1, pl.len() + 1).over("run").cast(pl.Int64))
            .drop("chosen_len", "rejected_len")
            .join(pairs, on="pair_id")
            .select("run", "rank", "pair_id", "step", chosen_drift="dc", rejected_drift="dr", margin="margin",
                    margin_gain="margin_gain", shared_prefix_len="shared_prefix_len",
                    prefix_share=pl.col("shared_prefix_len") / pl.min_horizontal("chosen_len", "rejected_len"),
                    tail_tokens=pl.max_horizontal("chosen_len", "rejected_len") - pl.col("shared_prefix_len"),
                    length_diff=pl.col("chosen_len") - pl.col("rejected_len")))
    assert_frames_close(got.select(want.columns), want, ["run", "rank"])
    # known structure: near-identical pairs are the culprits
    assert (got["prefix_share"] >= 0.5).mean() > 0.6


def collapse_windows(series, min_falls, min_acc):
    """Plain-Python alarm: runs of consecutive falls of the chosen-reward series at accuracy >= min_acc."""
    out, k = [], 0
    steps, rew, acc = series
    while k < len(steps):
        j = k
        while j + 1 < len(steps) and rew[j + 1] < rew[j] and acc[j + 1] >= min_acc:
            j += 1
        if j - k >= min_falls:
            out.append({"start_step": steps[k + 1], "alarm_step": steps[k + min_falls], "peak_step": steps[k],
                        "end_step": steps[j], "n_falls": j - k, "chosen_reward_drop": rew[k] - rew[j],
                        "still_falling": j == len(steps) - 1})
        k = j + 1
    return out


@pytest.mark.parametrize("min_falls,min_acc", [(3, 0.8), (2, 0.99), (5, 0.0)])
def test_collapse_matches_python(world, min_falls, min_acc):
    got = queries.run_query(world["con"], "collapse", {"min_falls": min_falls, "min_accuracy": min_acc})
    per = probes(world).group_by("run", "split", "step").agg(
        r=pl.col("chosen_reward").mean(), a=(pl.col("margin") > 0).mean()).sort("run", "split", "step")
    want = []
    for (run, split), g in per.group_by("run", "split", maintain_order=True):
        for w in collapse_windows((g["step"].to_list(), g["r"].to_list(), g["a"].to_list()), min_falls, min_acc):
            want.append({"run": run, "split": split, **w})
    cols = list(want[0])
    assert_frames_close(got.select(cols), pl.DataFrame(want), ["run", "split", "start_step"])
    # known structure: the synthetic collapse starts at 60% of training (step 72), noise blurs it by a probe
    late = got.filter(pl.col("still_falling"))
    assert late.height == 4 and set(late["peak_step"].to_list()) <= {60, 70, 80}


def test_length_matches_polars(world):
    got = queries.run_query(world["con"], "length")
    p = probes(world).with_columns(
        ld=(pl.col("chosen_len") - pl.col("rejected_len")).cast(pl.Float64),
        pt=pl.col("chosen_reward") / pl.col("chosen_len") - pl.col("rejected_reward") / pl.col("rejected_len"))
    want = p.group_by("run", "split", "step").agg(
        n_pairs=pl.len().cast(pl.Int64), length_diff_mean=pl.col("ld").mean(), margin_mean=pl.col("margin").mean(),
        corr_summed=pl.corr("margin", "ld"), corr_per_token=pl.corr("pt", "ld"),
        slope_summed=pl.cov("margin", "ld", ddof=0) / pl.col("ld").var(ddof=0))
    # constant margin (step 0): SQL says NULL, not NaN
    want = want.with_columns(pl.col("corr_summed", "corr_per_token").fill_nan(None))
    assert_frames_close(got, want, ["run", "split", "step"])
    assert got.filter(pl.col("step") == 0)["corr_summed"].null_count() == 4
    # known structure: the synthetic margin grows with length difference late in training
    last = got.filter(pl.col("step") == 120)
    assert last["corr_summed"].min() > 0.2


def test_train_eval_gap_matches_polars(world):
    got = queries.run_query(world["con"], "train_eval_gap")
    p = probes(world).with_columns(acc=(pl.col("margin") > 0).cast(pl.Float64))
    cols = {"margin": "margin", "accuracy": "acc", "chosen_drift": "dc", "rejected_drift": "dr", "loss": "loss"}
    aggs = [pl.col(src).filter(pl.col("split") == s).mean().alias(f"{s}_{name}")
            for name, src in cols.items() for s in ("train", "eval")]
    want = p.group_by("run", "step").agg(
        (pl.col("split") == "train").sum().cast(pl.Int64).alias("train_pairs"),
        (pl.col("split") == "eval").sum().cast(pl.Int64).alias("eval_pairs"), *aggs)
    want = want.with_columns(margin_gap=pl.col("eval_margin") - pl.col("train_margin"),
                             accuracy_gap=pl.col("eval_accuracy") - pl.col("train_accuracy"),
                             chosen_drift_gap=pl.col("eval_chosen_drift") - pl.col("train_chosen_drift"),
                             loss_gap=pl.col("eval_loss") - pl.col("train_loss"))
    assert_frames_close(got.select(want.columns), want, ["run", "step"])


def test_compare_matches_polars(world):
    got = queries.run_query(world["con"], "compare", {"tail": 5})
    p = probes(world)
    common = max(set.intersection(*[set(g["step"].to_list()) for _, g in p.group_by("run")]))
    assert common == 120
    at = p.filter(pl.col("step") == common).group_by("run", "split").agg(
        n_pairs=pl.len().cast(pl.Int64), chosen_drift_mean=pl.col("dc").mean(),
        rejected_drift_mean=pl.col("dr").mean(), margin_mean=pl.col("margin").mean(),
        accuracy=(pl.col("margin") > 0).mean())
    tails = steps_pl(world).sort("step").group_by("run").tail(5).group_by("run").agg(
        final_loss=pl.col("loss").mean(), final_accuracy=pl.col("reward_accuracy").mean())
    want = at.join(tails, on="run").with_columns(beta=pl.when(pl.col("run") == "beta0.1").then(0.1).otherwise(0.5))
    assert_frames_close(got.select(want.columns), want, ["run", "split"])
    assert got["step"].unique().to_list() == [common]
    # an explicit earlier step
    got40 = queries.run_query(world["con"], "compare", {"step": 40})
    assert got40["step"].unique().to_list() == [40] and got40.height == 4


def test_cache_overview_matches_polars(world):
    got = queries.run_query(world["con"], "cache_overview", {"near_share": 0.5, "near_tail": 3})
    vals = {(r["cache"], r["metric"]): r["value"] for r in got.iter_rows(named=True)}
    for cache in ("cache", "eval_cache"):
        p = pl.read_parquet(world[cache] / "part-*.parquet")
        tok = p["ref_chosen_logp"] / p["chosen_len"]
        near = (p["shared_prefix_len"] >= 0.5 * p.select(pl.min_horizontal("chosen_len", "rejected_len")).to_series()) | (
            p.select(pl.max_horizontal("chosen_len", "rejected_len")).to_series() - p["shared_prefix_len"] <= 3)
        want = {
            "n_pairs": p.height, "chosen_logp_per_token_mean": tok.mean(),
            "chosen_logp_per_token_p10": tok.quantile(0.1, "linear"),
            "chosen_logp_per_token_p90": tok.quantile(0.9, "linear"),
            "rejected_logp_per_token_p50": (p["ref_rejected_logp"] / p["rejected_len"]).quantile(0.5, "linear"),
            "prompt_len_max": p["prompt_len"].max(), "chosen_len_p50": p["chosen_len"].quantile(0.5, "linear"),
            "truncated_share": p["truncated"].mean(), "near_identical_share": near.mean(),
        }
        for m, v in want.items():
            assert vals[(cache, m)] == pytest.approx(v, rel=1e-9), (cache, m)
        rej = pl.read_parquet(world[cache] / "rejected_rows.parquet")["reason"].value_counts()
        for reason, n in rej.iter_rows():
            assert vals[(cache, f"rejected:{reason}")] == n


def test_findings_name_the_culprits(world):
    lines = queries.findings(world["con"])
    assert any("near-identical pairs" in s and "top" in s for s in lines)
    assert any("collapse alarm" in s for s in lines)
    assert any("chosen log-prob fell below the reference" in s for s in lines)


def test_list_queries_have_headers():
    qs = {q.name: q for q in queries.list_queries()}
    assert set(qs) == {"drift", "displacement", "collapse", "length", "compare", "cache_overview", "train_eval_gap"}
    for q in qs.values():
        assert q.description and q.needs, q.name
        assert "How to read" in q.sql, q.name
        for name in q.params:
            assert f"${name}" in q.sql, (q.name, name)
