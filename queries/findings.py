"""Findings in plain words, read off the `effects` diagnostic: only what stands above noise is stated.

Per run, on its eval probes (train probes when it has none): what is above noise (accuracy, margin, drift,
the share of pairs whose chosen log-prob fell), and what is not; whether near-identical pairs are over- or
under-represented among the top displaced pairs against their base rate; the reward-collapse alarm.
A run where nothing is above noise on its eval probes gets one sentence saying so, with the numbers that
show it (and what its train probes show above noise, if anything).
"""

import polars as pl

from queries.fmt import num
from queries.runner import get_query, run_query

MAX_RUNS = 4  # runs described; more are in the tables


def default_top() -> int:
    """Displaced pairs ranked by default: the displacement diagnostic's `limit` (one number for tables and
    findings)."""
    return get_query("displacement").params["limit"].default


def _ci(r, pct=False) -> str:
    if pct:
        return f"[{r['ci_low']:.0%}, {r['ci_high']:.0%}]"
    return f"[{num(r['ci_low'], 3)}, {num(r['ci_high'], 3)}]"


def _phrase(r) -> str:
    """One effect row as words, e.g. 'reward accuracy 0.66 [0.534, 0.761] (chance 0.5)'."""
    m, est = r["metric"], r["estimate"]
    if est is None:  # a share over no pairs: nothing moved beyond the step-0 noise
        what = {"accuracy": "margin", "chosen_fell_share": "chosen log-prob"}.get(m, m)
        return f"no pair's {what} moved beyond the step-0 noise"
    if m == "accuracy":
        return f"reward accuracy {num(est, 3)} {_ci(r)} (chance 0.5; {r['n']} pairs with a margin above noise)"
    if m == "margin_mean":
        return f"mean margin {num(est, 3)} {_ci(r)}"
    if m in ("chosen_drift_mean", "rejected_drift_mean"):
        return f"mean {m.split('_')[0]} drift {num(est, 3)} nats {_ci(r)}"
    if m == "chosen_fell_share":
        return f"chosen fell on {est:.0%} {_ci(r, pct=True)} of the {r['n']} pairs whose chosen moved"
    return f"{m} {num(est, 3)} {_ci(r)}"


def _split_rows(eff: pl.DataFrame, run: str, split: str) -> pl.DataFrame:
    return eff.filter((pl.col("run") == run) & (pl.col("split") == split))


def _run_sentence(run: str, rows: pl.DataFrame, other: pl.DataFrame, noise: float, z: float) -> str:
    """What `rows` (one run, one probe split) show above noise and what they do not; when nothing is above
    noise there, what the run's `other` split shows above noise (e.g. it fits its train pairs only)."""
    first = rows.row(0, named=True)
    head = (f"{run}, step {first['step']}, {rows['n'].max()} {first['split']} probe pairs ({_level(z)} intervals "
            f"in brackets; Holm-corrected tests; step-0 float noise {num(noise, 2)} nats)")
    above = [_phrase(r) for r in rows.iter_rows(named=True) if r["above_noise"]]
    below = [_phrase(r) for r in rows.iter_rows(named=True) if not r["above_noise"]]
    if above:
        return f"{head}. Above noise: " + "; ".join(above) + "." + (" Within noise: " + "; ".join(below) + "."
                                                                    if below else "")
    text = f"{head}: nothing is above noise. " + "; ".join(below) + "."
    other_above = [_phrase(r) for r in other.iter_rows(named=True) if r["above_noise"]]
    if other_above:
        o = other.row(0, named=True)
        text += (f" On its {other['n'].max()} {o['split']} probe pairs, above noise: " + "; ".join(other_above) +
                 ".")
    return text


def _level(z: float) -> str:
    from math import erf, sqrt

    return f"{erf(z / sqrt(2)):.0%}"


def _near_sentence(r) -> str:
    k = round(r["estimate"] * r["n"])
    more = r["estimate"] > r["null_value"]
    verdict = ("over-represented: they lead the displacement" if more else
               "under-represented: they do not lead the displacement")
    return (f"{r['run']}: near-identical pairs (relative token edit distance <= 0.1) are {k} of the top {r['n']} "
            f"displaced pairs ({r['estimate']:.0%} {_ci(r, pct=True)}) against {r['null_value']:.0%} of all its probe "
            f"pairs: {verdict}.")


def findings(con, top=None, z=None) -> list[str]:
    """Sentences about the runs behind `con`; `top` = displaced pairs compared (default: default_top())."""
    top = top or default_top()
    params = {"top": top} | ({"z": z} if z is not None else {})
    eff = run_query(con, "effects", params)
    if eff.is_empty():
        return ["no probe rows in the run logs yet: nothing to diagnose"]
    z = get_query("effects").params["z"].default if z is None else z
    noise = dict(con.sql("SELECT run, drift_noise FROM probe_noise").fetchall())
    out = []
    runs = eff["run"].unique(maintain_order=True).to_list()
    for run in runs[:MAX_RUNS]:
        ev, tr = _split_rows(eff, run, "eval"), _split_rows(eff, run, "train")
        rows, other = (ev, tr) if ev.height else (tr, ev)
        if rows.height:
            out.append(_run_sentence(run, rows, other, noise.get(run, 0.0), z))
        near = eff.filter((pl.col("run") == run) & (pl.col("metric") == "near_identical_in_top")
                          & pl.col("above_noise"))
        if near.height:
            out.append(_near_sentence(near.row(0, named=True)))
    coll = run_query(con, "collapse")
    for run in runs[:MAX_RUNS]:
        rows = coll.filter(pl.col("run") == run)
        if rows.is_empty():
            continue
        w = rows.sort("n_falls", descending=True).row(0, named=True)
        state = "and is still falling" if w["still_falling"] else f"until step {w['end_step']}"
        out.append(
            f"{run}: reward-collapse alarm on {w['split']} probes: mean chosen reward fell {w['n_falls']} "
            f"probes in a row from step {w['start_step']} {state} (down {num(w['chosen_reward_drop'], 3)}) "
            f"while accuracy stayed >= {num(w['min_accuracy'], 2)}.")
    if len(runs) > MAX_RUNS:
        out.append(f"(findings for the first {MAX_RUNS} of {len(runs)} runs; `refcache query effects` has all)")
    return out
