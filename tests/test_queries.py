"""Each named diagnostic's SQL result equals the same numbers computed independently with Polars from the
Parquet logs, on synthetic logs (tests/synth.py) whose structure is known."""

import math

import numpy as np
import polars as pl
import pytest
from oracles import levenshtein
from synth import make_world

import queries

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



def rel_edit(a, b) -> float:
    return levenshtein(a, b) / max(len(a), len(b), 1)


def step0_noise(w) -> pl.DataFrame:
    """Per run: the largest |policy - reference| log-prob, |margin| and |reward| over its step-0 probe rows."""
    return probes(w).filter(pl.col("step") == 0).group_by("run").agg(
        drift_noise=pl.max_horizontal(pl.col("dc").abs(), pl.col("dr").abs()).max(),
        margin_noise=pl.col("margin").abs().max(),
        reward_noise=pl.max_horizontal(pl.col("chosen_reward").abs(), pl.col("rejected_reward").abs()).max())


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


@pytest.mark.parametrize("tol", [0.05, 0.0])
def test_drift_matches_polars(world, tol):
    got = queries.run_query(world["con"], "drift", {"tol": tol})
    # a log-prob moved when it moved by more than tol AND the run's step-0 float noise
    p = probes(world).join(step0_noise(world), on="run").with_columns(
        thr=pl.max_horizontal(pl.lit(tol), pl.col("drift_noise")))
    q = lambda col, x: pl.col(col).quantile(x, interpolation="linear")
    want = p.group_by("run", "split", "step").agg(
        n_pairs=pl.len(),
        chosen_drift_mean=pl.col("dc").mean(), chosen_drift_p10=q("dc", 0.1), chosen_drift_p50=q("dc", 0.5),
        chosen_drift_p90=q("dc", 0.9),
        rejected_drift_mean=pl.col("dr").mean(), rejected_drift_p10=q("dr", 0.1),
        rejected_drift_p50=q("dr", 0.5), rejected_drift_p90=q("dr", 0.9),
        both_down_share=((pl.col("dc") < -pl.col("thr")) & (pl.col("dr") < -pl.col("thr"))).mean(),
        chosen_down_share=(pl.col("dc") < -pl.col("thr")).mean(),
        chosen_up_share=(pl.col("dc") > pl.col("thr")).mean(),
        margin_mean=pl.col("margin").mean(), accuracy=(pl.col("margin") > 0).mean(), loss_mean=pl.col("loss").mean(),
    )
    assert_frames_close(got, want.with_columns(pl.col("n_pairs").cast(pl.Int64)), ["run", "split", "step"])
    # known structure: step 0 is the reference itself (float noise only), later the chosen log-prob falls
    s0 = got.filter(pl.col("step") == 0)
    assert s0["chosen_drift_mean"].abs().max() < 1e-5 and s0["loss_mean"].to_list() == [pytest.approx(math.log(2))] * 4
    assert s0["chosen_down_share"].max() == 0 and s0["chosen_up_share"].max() == 0  # noise never counts as a move
    last = got.filter(pl.col("step") == 120)
    assert last["chosen_down_share"].min() > 0.9 and last["accuracy"].min() > 0.9


def test_displacement_matches_polars(world):
    limit = 7
    got = queries.run_query(world["con"], "displacement", {"limit": limit, "split": "all"})
    p = probes(world).join(step0_noise(world), on="run")
    bounds = p.group_by("run").agg(first=pl.col("step").min(), last=pl.col("step").max())
    now = p.join(bounds, on="run").filter(pl.col("step") == pl.col("last"))
    first = p.join(bounds, on="run").filter(pl.col("step") == pl.col("first")).select(
        "run", "split", "pair_id", m0="margin")
    pairs = pairs_pl(world).unique("pair_id").select("pair_id", "shared_prefix_len", "chosen_len", "rejected_len",
                                                     "chosen_ids", "rejected_ids")
    pairs = pairs.with_columns(edit_distance=pl.Series([levenshtein(a, b) for a, b in
                                                        zip(pairs["chosen_ids"], pairs["rejected_ids"])]))
    want = (now.join(first, on=["run", "split", "pair_id"])
            .with_columns(margin_gain=pl.col("margin") - pl.col("m0"))
            # displaced: chosen fell, and the margin grew, by more than the step-0 noise
            .filter((pl.col("dc") < -pl.col("drift_noise")) & (pl.col("margin_gain") > pl.col("margin_noise")))
            .sort("run", "dc", "pair_id")
            .group_by("run", maintain_order=True).head(limit)
            .with_columns(rank=pl.int_range(1, pl.len() + 1).over("run").cast(pl.Int64))
            .drop("chosen_len", "rejected_len")
            .join(pairs, on="pair_id")
            .with_columns(rel_edit=pl.col("edit_distance") / pl.max_horizontal("chosen_len", "rejected_len"))
            .select("run", "rank", "pair_id", "step", "edit_distance", "rel_edit", chosen_drift="dc",
                    rejected_drift="dr", margin="margin", margin_gain="margin_gain",
                    shared_prefix_len="shared_prefix_len", near_identical=pl.col("rel_edit") <= 0.1,
                    length_diff=pl.col("chosen_len") - pl.col("rejected_len")))
    assert_frames_close(got.select(want.columns), want, ["run", "rank"])
    # known structure: near-identical pairs are the culprits, far above their base rate (25% by construction)
    assert got["near_identical"].mean() > 0.6


def test_edit_distance_macros(world):
    """token_edit_distance counts tokens (ids past the UTF-16 surrogates and the BMP included), and
    rel_edit_distance / near_identical follow from it."""
    rng = np.random.default_rng(3)
    cases = [([], []), ([1, 2, 3], []), ([5], [5]), ([1, 2, 3, 4], [1, 2, 4]), ([55296, 57343, 70000], [55296, 1])]
    for _ in range(40):
        a = rng.integers(0, 200_000, rng.integers(0, 30)).tolist()
        b = (a[: rng.integers(0, len(a) + 1)] + rng.integers(0, 200_000, rng.integers(0, 5)).tolist()
             if rng.random() < 0.5 else rng.integers(0, 200_000, rng.integers(0, 30)).tolist())
        cases.append((a, b))
    con = world["con"]
    for a, b in cases:
        ed, rel, near = con.sql("SELECT token_edit_distance($a::INTEGER[], $b::INTEGER[]), "
                                "rel_edit_distance($a::INTEGER[], $b::INTEGER[]), "
                                "near_identical($a::INTEGER[], $b::INTEGER[])", params={"a": a, "b": b}).fetchall()[0]
        assert ed == levenshtein(a, b), (a, b)
        assert rel == pytest.approx(rel_edit(a, b)) and near == (rel_edit(a, b) <= 0.1)


def test_interval_macros(world):
    con = world["con"]
    for x in (0.0, 0.5, 1.96, 2.576, 4.0, 7.0):
        assert con.sql(f"SELECT normal_p({x})").fetchall()[0][0] == pytest.approx(math.erfc(x / math.sqrt(2)),
                                                                                abs=2e-7)
    for k, n in ((0, 10), (3, 10), (10, 10), (42, 64)):
        lo, hi = con.sql(f"SELECT wilson_low({k}, {n}, 1.96), wilson_high({k}, {n}, 1.96)").fetchall()[0]
        assert (lo, hi) == pytest.approx(wilson(k, n, 1.96))
    assert con.sql("SELECT wilson_low(0, 0, 1.96)").fetchall()[0][0] is None


def wilson(k, n, z):
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def collapse_windows(series, min_falls, min_acc, noise):
    """Plain-Python alarm: runs of consecutive falls (by more than `noise`) of the chosen-reward series at
    accuracy >= min_acc."""
    out, k = [], 0
    steps, rew, acc = series
    while k < len(steps):
        j = k
        while j + 1 < len(steps) and rew[j + 1] < rew[j] - noise and acc[j + 1] >= min_acc:
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
    noise = dict(step0_noise(world).select("run", "reward_noise").iter_rows())
    want = []
    for (run, split), g in per.group_by("run", "split", maintain_order=True):
        for w in collapse_windows((g["step"].to_list(), g["r"].to_list(), g["a"].to_list()), min_falls, min_acc,
                                  noise[run]):
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
        slope_summed=pl.cov("margin", "ld", ddof=0) / pl.col("ld").var(ddof=0),
        max_margin=pl.col("margin").abs().max())
    # margins at rounding level (step 0, or all within the step-0 margin noise): no correlation, NULL
    noise_only = (pl.col("step") == 0) | (pl.col("max_margin") <= pl.col("margin_noise"))
    want = (want.join(step0_noise(world), on="run")
            .with_columns([pl.when(noise_only).then(None).otherwise(pl.col(c)).alias(c)
                           for c in ("corr_summed", "corr_per_token", "slope_summed")])
            .drop("max_margin", "drift_noise", "margin_noise", "reward_noise"))
    assert_frames_close(got, want, ["run", "split", "step"])
    s0 = got.filter(pl.col("step") == 0)
    assert s0["corr_summed"].null_count() == 4 and s0["slope_summed"].null_count() == 4
    assert got.filter(pl.col("step") > 0)["corr_summed"].null_count() == 0
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
    got = queries.run_query(world["con"], "cache_overview")
    vals = {(r["cache"], r["metric"]): r["value"] for r in got.iter_rows(named=True)}
    for cache in ("cache", "eval_cache"):
        p = pl.read_parquet(world[cache] / "part-*.parquet")
        tok = p["ref_chosen_logp"] / p["chosen_len"]
        rel = pl.Series([rel_edit(a, b) for a, b in zip(p["chosen_ids"], p["rejected_ids"])])
        near = rel <= 0.1
        want = {
            "n_pairs": p.height, "chosen_logp_per_token_mean": tok.mean(),
            "chosen_logp_per_token_p10": tok.quantile(0.1, "linear"),
            "chosen_logp_per_token_p90": tok.quantile(0.9, "linear"),
            "rejected_logp_per_token_p50": (p["ref_rejected_logp"] / p["rejected_len"]).quantile(0.5, "linear"),
            "prompt_len_max": p["prompt_len"].max(), "chosen_len_p50": p["chosen_len"].quantile(0.5, "linear"),
            "truncated_share": p["truncated"].mean(), "near_identical_share": near.mean(),
            "rel_edit_mean": rel.mean(),
        }
        for m, v in want.items():
            assert vals[(cache, m)] == pytest.approx(v, rel=1e-9), (cache, m)
        # the synthetic near-identical pairs (25% by construction) are what the rule finds
        assert 0.15 < vals[(cache, "near_identical_share")] < 0.35
        rej = pl.read_parquet(world[cache] / "__refcache__" / "rejected_rows.parquet")["reason"].value_counts()
        for reason, n in rej.iter_rows():
            assert vals[(cache, f"rejected:{reason}")] == n


def effects_python(w, top=15, z=1.96, alpha=0.05) -> pl.DataFrame:
    """The effects diagnostic recomputed in Python: estimates, intervals, p-values, Holm per run."""
    p = probes(w).join(step0_noise(w), on="run")
    last = p.group_by("run").agg(last=pl.col("step").max())
    p = p.join(last, on="run").filter(pl.col("step") == pl.col("last"))
    rows = []
    for (run, split), g in p.group_by("run", "split"):
        dn, mn = g["drift_noise"][0], g["margin_noise"][0]
        for metric, v, noise in (("chosen_drift_mean", g["dc"], dn), ("rejected_drift_mean", g["dr"], dn),
                                 ("margin_mean", g["margin"], mn)):
            est, se = v.mean(), v.std() / math.sqrt(v.len())
            stat = 0.0 if abs(est) <= noise else abs(est) / se
            rows.append((run, split, metric, est, est - z * se, est + z * se, 0.0, stat))
        for metric, k, n in (("accuracy", (g["margin"] > mn).sum(), (g["margin"].abs() > mn).sum()),
                             ("chosen_fell_share", (g["dc"] < -dn).sum(), (g["dc"].abs() > dn).sum())):
            rows.append((run, split, metric, k / n, *wilson(k, n, z), 0.5, abs(k / n - 0.5) / math.sqrt(0.25 / n)))
    disp = queries.run_query(w["con"], "displacement", {"limit": top})
    pairs = pairs_pl(w).unique("pair_id")
    near = {pid: rel_edit(a, b) <= 0.1 for pid, a, b in pairs.select("pair_id", "chosen_ids", "rejected_ids").rows()}
    for run in p["run"].unique():
        ids = p.filter(pl.col("run") == run)["pair_id"].unique()
        base = sum(near[i] for i in ids) / len(ids)
        top_ids = disp.filter(pl.col("run") == run)["pair_id"]
        k, n = sum(near[i] for i in top_ids), len(top_ids)
        rows.append((run, "all", "near_identical_in_top", k / n, *wilson(k, n, z), base,
                     abs(k / n - base) / math.sqrt(base * (1 - base) / n)))
    df = pl.DataFrame(rows, orient="row", schema=["run", "split", "metric", "estimate", "ci_low", "ci_high",
                                                  "null_value", "stat"])
    df = df.with_columns(p_value=pl.col("stat").map_elements(lambda x: math.erfc(x / math.sqrt(2)),
                                                             return_dtype=pl.Float64))
    out = []
    for run, g in df.group_by("run"):
        g = g.sort("p_value")
        ok, flags = True, []
        for k, pv in enumerate(g["p_value"]):
            ok = ok and pv <= alpha / (g.height - k)
            flags.append(ok)
        out.append(g.with_columns(above_noise=pl.Series(flags)))
    return pl.concat(out).drop("stat")


def test_effects_match_python(world):
    got = queries.run_query(world["con"], "effects")
    want = effects_python(world)
    keys = ["run", "split", "metric"]
    assert got.height == want.height == 2 * (2 * 5 + 1)
    got, want = got.sort(keys), want.sort(keys)
    for c in ("estimate", "ci_low", "ci_high", "null_value"):
        assert got[c].to_list() == pytest.approx(want[c].to_list(), rel=1e-9, abs=1e-12), c
    assert got["p_value"].to_list() == pytest.approx(want["p_value"].to_list(), abs=2e-7)
    assert got["above_noise"].to_list() == want["above_noise"].to_list()


@pytest.fixture(scope="module")
def flat_world(tmp_path_factory):
    """Runs that learned nothing: after step 0 every log-prob moves by symmetric per-pair noise only."""
    w = make_world(tmp_path_factory.mktemp("flat"), runs=(("flat_a", 0.1), ("flat_b", 0.5)), steps=120,
                   probe_every=10, n_probe=24, learn=0.0)
    w["con"] = queries.connect(w["runs"])
    return w


def test_noise_rule_learning_run_yields_findings(world):
    eff = queries.run_query(world["con"], "effects")
    for run in ("beta0.1", "beta0.5"):
        ev = eff.filter((pl.col("run") == run) & (pl.col("split") == "eval"))
        assert ev["above_noise"].all(), ev  # the synthetic run learned: every effect is real
        near = eff.filter((pl.col("run") == run) & (pl.col("metric") == "near_identical_in_top")).row(0, named=True)
        assert near["above_noise"] and near["estimate"] > near["null_value"]
    lines = queries.findings(world["con"])
    assert sum("Above noise: reward accuracy" in s and "mean chosen drift" in s for s in lines) == 2
    assert sum("near-identical pairs" in s and "over-represented" in s and "of the top 15" in s
               for s in lines) == 2
    assert any("collapse alarm" in s for s in lines)
    assert not any("nothing is above noise" in s for s in lines)


def test_noise_rule_flat_run_yields_none(flat_world):
    eff = queries.run_query(flat_world["con"], "effects")
    assert eff.height == 2 * (2 * 5 + 1) and not eff["above_noise"].any()
    # tested one by one at 95%, noise alone would have produced "findings" here
    assert ((eff["ci_low"] > eff["null_value"]) | (eff["ci_high"] < eff["null_value"])).any()
    lines = queries.findings(flat_world["con"])
    assert len(lines) == 2 and all("nothing is above noise" in s and "Above noise" not in s for s in lines)
    assert queries.run_query(flat_world["con"], "collapse").is_empty()


def test_top_is_one_number():
    from queries.findings import default_top

    qs = {q.name: q for q in queries.list_queries()}
    assert qs["effects"].params["top"].default == qs["displacement"].params["limit"].default == default_top() == \
        qs["displacement_prediction"].params["top"].default


def test_list_queries_have_headers():
    qs = {q.name: q for q in queries.list_queries()}
    assert set(qs) == {"drift", "displacement", "collapse", "length", "compare", "cache_overview", "train_eval_gap",
                       "effects", "slices", "displacement_risk", "displacement_prediction"}  # _shared.sql: no diagnostic
    for q in qs.values():
        assert q.description and q.needs, q.name
        assert "How to read" in q.sql, q.name
        for name in q.params:
            assert f"${name}" in q.sql, (q.name, name)
