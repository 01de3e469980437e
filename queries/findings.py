"""A few findings in plain words, read off the named diagnostics (for the demo and the report)."""

import polars as pl

from queries.runner import run_query


def _split_rows(df: pl.DataFrame, run: str) -> pl.DataFrame:
    """The run's rows of the eval probes if it has them, else of the train probes."""
    rows = df.filter(pl.col("run") == run)
    ev = rows.filter(pl.col("split") == "eval")
    return ev if ev.height else rows


def is_near(prefix_share, tail_tokens, near_share=0.5, near_tail=3):
    """Near-identical: the shared prefix covers >= near_share of the shorter completion, or the pair differs
    in <= near_tail tokens after it (the same rule as cache_overview's near_identical_share)."""
    return (prefix_share.fill_null(0) >= near_share) | (tail_tokens.fill_null(10**9) <= near_tail)


def near_identical_counts(con, disp: pl.DataFrame, near_share=0.5, near_tail=3):
    """(displaced near-identical, displaced total, near-identical share of all probe pairs) per run."""
    out = {}
    for run in disp["run"].unique(maintain_order=True).to_list():
        d = disp.filter(pl.col("run") == run)
        n_near = int(is_near(d["prefix_share"], d["tail_tokens"], near_share, near_tail).sum())
        base = con.sql(
            """SELECT avg(CASE WHEN p.shared_prefix_len >= $s * least(p.chosen_len, p.rejected_len)
                                 OR greatest(p.chosen_len, p.rejected_len) - p.shared_prefix_len <= $t
                               THEN 1.0 ELSE 0.0 END)
               FROM (SELECT DISTINCT pair_id FROM examples WHERE source = 'probe' AND run = $run) e
               JOIN (SELECT pair_id, any_value(shared_prefix_len) AS shared_prefix_len,
                            any_value(chosen_len) AS chosen_len, any_value(rejected_len) AS rejected_len
                     FROM pairs GROUP BY pair_id) p USING (pair_id)""",
            params={"s": near_share, "t": near_tail, "run": run}).fetchall()[0][0]
        out[run] = (n_near, d.height, base)
    return out


def findings(con, top=20, near_share=0.5, near_tail=3) -> list[str]:
    """Two to four sentences: drift at the last probe, displacement culprits, the collapse alarm."""
    from queries.db import view_sources

    out = []
    drift = run_query(con, "drift")
    if drift.is_empty():
        return ["no probe rows in the run logs yet: nothing to diagnose"]
    runs = drift["run"].unique(maintain_order=True).to_list()
    for run in runs[:4]:
        rows = _split_rows(drift, run).sort("step")
        last = rows.row(-1, named=True)
        out.append(
            f"{run}: by step {last['step']}, chosen log-prob fell below the reference on "
            f"{last['chosen_down_share']:.0%} of {last['split']} probe pairs (chosen and rejected both fell on "
            f"{last['both_down_share']:.0%}; mean chosen drift {last['chosen_drift_mean']:+.2f} nats) while "
            f"reward accuracy reached {last['accuracy']:.2f} (mean margin {last['margin_mean']:.2f}).")
    if view_sources(con).get("pairs"):
        disp = run_query(con, "displacement", {"limit": top})
        counts = near_identical_counts(con, disp, near_share, near_tail)
        for run, (n_near, n, base) in list(counts.items())[:4]:
            if n:
                out.append(
                    f"{run}: near-identical pairs (differing in <= {near_tail} tokens after a shared prefix, or "
                    f"sharing >= {near_share:.0%} of the shorter completion) are {n_near} of the top {n} displaced "
                    f"pairs (chosen fell below the reference while the margin grew), and {(base or 0):.0%} of "
                    "all probe pairs.")
    coll = run_query(con, "collapse")
    for run in runs[:4]:
        rows = _split_rows(coll, run)
        if rows.is_empty():
            continue
        w = rows.sort("n_falls", descending=True).row(0, named=True)
        state = "and is still falling" if w["still_falling"] else f"until step {w['end_step']}"
        out.append(
            f"{run}: reward-collapse alarm on {w['split']} probes: mean chosen reward fell {w['n_falls']} "
            f"probes in a row from step {w['start_step']} {state} (down {w['chosen_reward_drop']:.3f}) while "
            f"accuracy stayed >= {w['min_accuracy']:.2f}.")
    if coll.is_empty():
        out.append("no reward-collapse alarm: mean chosen reward never fell for 3 probes in a row "
                   "at accuracy >= 0.8.")
    return out
