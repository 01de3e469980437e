"""`refcache verify`: re-score a sample of cached pairs with the hf backend and compare.

Reports per-token max / mean |diff| (nats) and the implied reward error at beta: DPO's implicit reward is
beta * (log pi - log ref) summed over a completion, so an error e in the cached sum shifts the reward by
beta * e and the margin (chosen - rejected) by beta * (e_chosen - e_rejected).
"""

from pathlib import Path

import numpy as np

from pipeline.backends import HFScorer
from pipeline.cache import load_table, read_manifest
from pipeline.fingerprint import file_sha256, identity_diff, model_identity
from refcache import UserError

DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.1}  # bf16: ~0.07 seen, coarse


def verify(cache_dir, sample=32, tolerance=None, beta=0.1, model=None, dtype=None, batch_size=16, seed=0,
           scorer=None) -> dict:
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    for s in m["shards"]:
        if file_sha256(cache_dir / s["file"]) != s["sha256"]:
            raise UserError(f"{cache_dir / s['file']}: contents changed since the manifest was written "
                            "(sha256 differs); re-run precompute")
    model_dir = model or m["model"]["path"]
    if scorer is None and identity_diff(m["model"], model_identity(model_dir), "model"):
        raise UserError(f"{model_dir}: weights/config differ from the model the cache was made with "
                        f"(sha256 {m['model']['sha256'][:12]}…); pass the right --model")
    dtype = dtype or m["backend"]["dtype"]
    tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance

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
    diffs = np.concatenate([np.abs(a - b) for a, b in zip(fresh, cached)])
    err = np.array([a.sum() - b.sum() for a, b in zip(fresh, cached)])  # per sequence: chosen, rejected, ...
    margin_err = beta * np.abs(err[0::2] - err[1::2])
    result = {
        "pairs": n, "tokens": int(diffs.size), "dtype": dtype, "cache_backend": m["backend"]["name"],
        "max_abs_diff": float(diffs.max()), "mean_abs_diff": float(diffs.mean()),
        "beta": beta, "reward_error_max": float(beta * np.abs(err).max()),
        "margin_error_max": float(margin_err.max()), "tolerance": tolerance,
    }
    result["passed"] = result["max_abs_diff"] <= tolerance
    return result


def format_result(r: dict, cache_dir) -> str:
    verdict = "OK" if r["passed"] else "FAILED"
    return (f"verify {cache_dir}: {r['pairs']} pairs, {r['tokens']:,} completion tokens re-scored with hf "
            f"({r['dtype']}) against the {r['cache_backend']} cache\n"
            f"per-token |diff|: max {r['max_abs_diff']:.3g} nats, mean {r['mean_abs_diff']:.3g} nats\n"
            f"implied reward error at beta={r['beta']:g}: max {r['reward_error_max']:.3g} (reward), "
            f"{r['margin_error_max']:.3g} (margin)\n"
            f"tolerance {r['tolerance']:g} nats per token: {verdict}")
