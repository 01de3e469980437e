"""`refcache verify`: check the whole cache, then re-score a sample of cached pairs with the hf backend and compare.

First, every part is hashed in full against the manifest (missing, extra, truncated or changed parts are
refused) and every pair is checked for consistency: stored sums equal the sums of the stored token log-probs,
ids, log-probs and lengths agree, pair_id is unique. Then N pairs are re-scored.

A token passes when |cached - fresh| <= atol + rtol * |log p| (numpy.allclose's rule, log p the fresh value):
float noise in a log-prob grows with its magnitude (log p = logit - logsumexp, both large for an unlikely
token), so one absolute bound is too loose for likely tokens or too tight for unlikely ones.

Also reported, since it is what training sees: the implied reward error at beta. DPO's implicit reward is
beta * (log pi - log ref) summed over a completion, so an error e in the cached sum shifts the reward by
beta * e and the margin (chosen - rejected) by beta * (e_chosen - e_rejected).
"""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.backends import HFScorer
from pipeline.cache import check_parts, load_table, read_manifest
from pipeline.dedup import SeenPairs
from pipeline.fingerprint import identity_diff, model_identity
from refcache_base import UserError
from refcache_base.limits import allowed, inside

# (atol, rtol) by the dtype both scores were made in. float32: the contract's 1e-4 nats, plus 1e-5 per nat of
# |log p|. bfloat16: 1 nat plus 0.1 per nat (bf16's noise is set by the logits' size more than by |log p|). Both
# leave room above the largest differences measured between the backends (BENCHMARKS.md).
TOLERANCE = {"float32": (1e-4, 1e-5), "bfloat16": (1.0, 0.1)}


def check_arguments(sample, tolerance, rtol, beta, batch_size):
    """One-line UserError naming the first flag out of range (before any work); allowed values in interval
    notation (refcache_base/limits.py)."""
    for flag, v in (("--sample", sample), ("--batch-size", batch_size)):
        if not inside(v, "[1, inf)", whole=True):
            raise UserError(f"{flag} {v}: must be {allowed('[1, inf)', whole=True)}")
    for flag, v, spec in (("--tolerance", tolerance, "(0, inf)"), ("--rtol", rtol, "[0, inf)"),
                          ("--beta", beta, "(0, inf)")):
        if v is None and flag != "--beta":
            continue  # the dtype's default
        if not inside(v, spec):
            raise UserError(f"{flag} {v}: must be {allowed(spec, finite_first=True)}")


def verify(cache_dir, sample=32, tolerance=None, rtol=None, beta=0.1, model=None, dtype=None, batch_size=16,
           seed=0, scorer=None) -> dict:
    """Re-score `sample` pairs and compare; `tolerance` is atol (nats), `rtol` the share of |log p| added."""
    check_arguments(sample, tolerance, rtol, beta, batch_size)
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    consistent = check_consistency(cache_dir, check_parts(cache_dir, m, full=True))
    model_dir = model or m["model"]["path"]
    if scorer is None and identity_diff(m["model"], model_identity(model_dir), "model"):
        raise UserError(f"{model_dir}: weights/config differ from the model the cache was made with "
                        f"(sha256 {m['model']['sha256'][:12]}…); pass the right --model")
    dtype = dtype or m["backend"]["dtype"]
    default_atol, default_rtol = TOLERANCE.get(dtype, TOLERANCE["float32"])
    atol = default_atol if tolerance is None else tolerance
    rtol = default_rtol if rtol is None else rtol

    t = load_table(cache_dir, ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_token_logps",
                               "ref_rejected_token_logps"])
    n = min(sample, t.num_rows)
    if n == 0:
        raise UserError(f"{cache_dir}: the cache has no pairs to verify")
    rows = np.sort(np.random.default_rng(seed).choice(t.num_rows, size=n, replace=False))
    t = t.take(rows).to_pydict()
    seqs, starts, cached = [], [], []
    for i in range(n):
        p = t["prompt_ids"][i]
        for side in ("chosen", "rejected"):
            seqs.append(p + t[f"{side}_ids"][i])
            starts.append(len(p))
            cached.append(np.asarray(t[f"ref_{side}_token_logps"][i], dtype=np.float64))
    scorer = scorer or HFScorer(model_dir, dtype, batch_size=batch_size)
    fresh = [np.asarray(x, dtype=np.float64) for x in scorer.score(seqs, np.asarray(starts))]
    return {"pairs": n, "dtype": dtype, "cache_backend": m["backend"]["name"], "consistent_pairs": consistent,
            **compare(fresh, cached, atol, rtol, beta)}


def compare(fresh, cached, atol, rtol, beta) -> dict:
    """Per-token agreement of two scorings of the same sequences (chosen, rejected, chosen, ... per pair), judged
    |cached - fresh| <= atol + rtol * |fresh|, and the reward and margin errors they imply at beta."""
    diff = np.concatenate([np.abs(a - b) for a, b in zip(fresh, cached)])
    logp = np.concatenate(fresh)
    ratio = diff / (atol + rtol * np.abs(logp))  # <= 1 passes
    worst = int(np.argmax(ratio))
    err = np.array([a.sum() - b.sum() for a, b in zip(fresh, cached)])  # per sequence: chosen, rejected, ...
    margin_err = beta * np.abs(err[0::2] - err[1::2])
    return {
        "tokens": int(diff.size), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "median_seq_max_diff": float(np.median([np.abs(a - b).max(initial=0.0) for a, b in zip(fresh, cached)])),
        "atol": atol, "rtol": rtol, "worst_ratio": float(ratio[worst]), "worst_diff": float(diff[worst]),
        "worst_logp": float(logp[worst]), "tokens_over": int((ratio > 1).sum()),
        "beta": beta, "reward_error_max": float(beta * np.abs(err).max()),
        "margin_error_max": float(margin_err.max()), "margin_error_mean": float(margin_err.mean()),
        "passed": bool(ratio[worst] <= 1),
    }


CONSISTENCY_COLUMNS = ["pair_id", "source_index", "prompt_ids", "prompt_len", "chosen_ids", "chosen_len",
                       "ref_chosen_token_logps", "ref_chosen_logp", "rejected_ids", "rejected_len",
                       "ref_rejected_token_logps", "ref_rejected_logp"]


def check_consistency(cache_dir, parts) -> int:
    """Every pair of every part, one part at a time: see `_inconsistency`; and pair_id unique in the cache.
    Returns the number of pairs; one-line UserError naming the part and the first bad pair."""
    seen, total = SeenPairs(), 0
    for path in parts:
        t = pq.read_table(path, columns=CONSISTENCY_COLUMNS)
        problem = _inconsistency(t)
        if problem is None:
            ids = t.column("pair_id").to_pylist()
            dup = seen.first_rows(ids, np.arange(total, total + len(ids)))[0] != np.arange(total, total + len(ids))
            if dup.any():
                i = int(np.flatnonzero(dup)[0])
                problem = int(dup.sum()), i, f"pair_id {ids[i]} appears earlier in the cache too"
            total += len(ids)
        if problem is not None:
            count, i, what = problem
            raise UserError(f"{path}: {count} pair(s) inconsistent; first, source_index "
                            f"{t.column('source_index')[i].as_py()}: {what}; the part was changed after it was "
                            "written: move it out of the cache and re-run precompute")
    return total


def _inconsistency(t) -> tuple[int, int, str] | None:
    """(pairs affected, first row, what) for the first check one part's pairs fail, or None: token ids,
    log-probs and *_len agree; log-probs are finite; each stored sum equals the float64 sum of its float32
    token log-probs (to 1e-9 relative: only the order of summation may differ)."""
    def first(mask):
        return int(mask.sum()), int(np.flatnonzero(mask)[0])

    n = {"prompt": _list_lengths(t.column("prompt_ids"))}
    for side in ("chosen", "rejected"):
        n[side] = _list_lengths(t.column(f"{side}_ids"))
        lp = t.column(f"ref_{side}_token_logps").combine_chunks()
        n_lp = _list_lengths(lp)
        if (n_lp != n[side]).any():
            count, i = first(n_lp != n[side])
            return count, i, f"{n_lp[i]} {side} token log-probs for {n[side][i]} {side}_ids"
        rows = np.repeat(np.arange(len(n_lp)), n_lp)
        vals = lp.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.isfinite(vals).all():
            count, i = first(np.isin(np.arange(len(n_lp)), rows[~np.isfinite(vals)]))
            return count, i, f"a {side} token log-prob is not finite"
        sums = np.bincount(rows, weights=vals, minlength=len(n_lp))
        stored = t.column(f"ref_{side}_logp").to_numpy()
        off = ~(np.abs(sums - stored) <= 1e-9 * (1 + np.abs(sums)))  # NaN is off too
        if off.any():
            count, i = first(off)
            return count, i, (f"stored ref_{side}_logp {stored[i]!r} is not the sum of its {n_lp[i]} token log-probs "
                              f"({sums[i]!r})")
    for name in ("prompt", "chosen", "rejected"):
        lens = t.column(f"{name}_len").to_numpy()
        if (lens != n[name]).any():
            count, i = first(lens != n[name])
            return count, i, f"{name}_len {lens[i]} but {n[name][i]} {name}_ids"
    return None


def _list_lengths(col) -> np.ndarray:
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    return np.diff(arr.offsets.to_numpy()).astype(np.int64)


def format_result(r: dict, cache_dir) -> str:
    verdict = "OK" if r["passed"] else f"FAILED ({r['tokens_over']:,} tokens over)"
    return (f"verify {cache_dir}: all {r['consistent_pairs']:,} pairs consistent (parts' sha256, sums = token "
            "log-probs, ids = lengths)\n"
            f"{r['pairs']} pairs, {r['tokens']:,} completion tokens re-scored with hf "
            f"({r['dtype']}) against the {r['cache_backend']} cache\n"
            f"per-token |diff|: max {r['max_abs_diff']:.2g} nats, mean {r['mean_abs_diff']:.2g}, median of "
            f"per-sequence max {r['median_seq_max_diff']:.2g}\n"
            f"tolerance {r['atol']:g} + {r['rtol']:g} x |log p|: worst token at {r['worst_ratio']:.2f} of its bound "
            f"(|diff| {r['worst_diff']:.2g} at log p {r['worst_logp']:.3g}): {verdict}\n"
            f"implied error at beta={r['beta']:g}: reward max {r['reward_error_max']:.2g}, "
            f"margin max {r['margin_error_max']:.2g} (mean {r['margin_error_mean']:.2g})")
