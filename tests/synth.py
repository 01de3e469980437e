"""Synthetic caches and run logs with known structure, written in the exact stage-1/stage-2 schemas.

Used by the tests (small logs whose diagnostics can be checked by hand; import it as `synth`, as pytest puts
tests/ on sys.path) and by `bench/queries.py` (10 million example rows) and `bench/cache_check.py`, which put
tests/ on sys.path themselves. No model is involved: token ids and log-probs are random numbers shaped like
real ones, and the policy trajectories follow a simple model with the failure modes the diagnostics look for:

- near-identical pairs (32+ tokens, all but the last one or two shared) see their chosen log-prob fall while
  the margin grows (likelihood displacement);
- after `collapse_at` (a fraction of training) every chosen log-prob keeps falling while accuracy stays high
  (reward collapse);
- the margin grows with the length difference (length exploitation).

Step-0 probes carry float-sized noise (`noise0`), as real ones do. `learn=0` writes a run that learned
nothing: every later log-prob moves only by symmetric per-pair noise.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache import REJECTED_FILE, manifest_path, side_dir
from pipeline.fingerprint import file_sha256
from refcache_base.cache_schema import (
    CACHE_SCHEMA,
    CHES_COMPUTED,
    REJECTED_REQUIRED,
    REJECTED_SCHEMA,
    SCHEMA_VERSION,
)
from refcache_base.runlog_schema import EXAMPLES_SCHEMA, STEPS_SCHEMA


def _pair_ids(n, seed):
    return [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()[:16] for i in range(n)]


def _lists(lengths, values, typ):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def make_cache(out, n_pairs=200, seed=0, near_share=0.25, n_rejected=5, shard_rows=None, max_len=64, ches=False):
    """Write a stage-1-shaped cache to `out`; return its pairs as a pyarrow Table (token lists included)."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompt_len = rng.integers(4, max_len // 2, n_pairs)
    chosen_len = rng.integers(4, max_len, n_pairs)
    rejected_len = rng.integers(4, max_len, n_pairs)
    near = rng.random(n_pairs) < near_share
    # near-identical pairs: 32+ tokens (half of max_len), same length give or take one token, all but the last
    # 1-2 tokens shared, so at most 3 of 32 tokens differ (queries' near_identical: relative edit distance <= 0.1)
    long = np.random.default_rng(seed + 7).integers(max_len // 2, max_len, n_pairs)
    chosen_len = np.where(near, long, chosen_len)
    rejected_len = np.where(near, chosen_len + rng.integers(-1, 2, n_pairs), rejected_len).clip(2)
    shared = np.where(near, np.minimum(chosen_len, rejected_len) - rng.integers(1, 3, n_pairs),
                      rng.integers(0, 3, n_pairs))
    shared = np.minimum(shared, np.minimum(chosen_len, rejected_len) - 1).clip(0)
    chosen_ids = rng.integers(3, 500, chosen_len.sum())
    rejected_ids = rng.integers(3, 500, rejected_len.sum())
    c_off = np.concatenate([[0], np.cumsum(chosen_len)])
    r_off = np.concatenate([[0], np.cumsum(rejected_len)])
    for i in np.nonzero(shared)[0]:  # make the shared prefix real and the next token differ
        k = shared[i]
        rejected_ids[r_off[i]:r_off[i] + k] = chosen_ids[c_off[i]:c_off[i] + k]
        if rejected_ids[r_off[i] + k] == chosen_ids[c_off[i] + k]:
            rejected_ids[r_off[i] + k] = chosen_ids[c_off[i] + k] + 1
    chosen_lp = -rng.gamma(1.5, 1.2, chosen_len.sum()).astype(np.float32)
    rejected_lp = -rng.gamma(1.5, 1.4, rejected_len.sum()).astype(np.float32)
    sums = lambda v, off: np.add.reduceat(v.astype(np.float64), off[:-1])
    pair_id = _pair_ids(n_pairs, seed)
    table = pa.table(
        {
            "pair_id": pair_id,
            "source_index": np.arange(n_pairs, dtype=np.int64) + np.cumsum(rng.random(n_pairs) < 0.02),
            "prompt_ids": _lists(prompt_len, rng.integers(3, 500, prompt_len.sum()), pa.int32()),
            "chosen_ids": _lists(chosen_len, chosen_ids, pa.int32()),
            "rejected_ids": _lists(rejected_len, rejected_ids, pa.int32()),
            "ref_chosen_token_logps": _lists(chosen_len, chosen_lp, pa.float32()),
            "ref_rejected_token_logps": _lists(rejected_len, rejected_lp, pa.float32()),
            "ref_chosen_logp": sums(chosen_lp, c_off),
            "ref_rejected_logp": sums(rejected_lp, r_off),
            "prompt_len": prompt_len.astype(np.int32),
            "chosen_len": chosen_len.astype(np.int32),
            "rejected_len": rejected_len.astype(np.int32),
            "shared_prefix_len": shared.astype(np.int32),
            "truncated": rng.random(n_pairs) < 0.05,
            # not computed by this world unless asked: then random scores, as a cache whose backend computed them
            "ches": rng.normal(0, 50, n_pairs) if ches else pa.nulls(n_pairs, pa.float64()),
            "ln_ches": rng.normal(-80, 60, n_pairs) if ches else pa.nulls(n_pairs, pa.float64()),
        },
        schema=CACHE_SCHEMA,
    )
    shard_rows = shard_rows or n_pairs
    shards = []
    for k, start in enumerate(range(0, n_pairs, shard_rows)):
        name = f"part-{k:05d}.parquet"
        pq.write_table(table.slice(start, shard_rows), out / name, compression="zstd")
        shards.append({"file": name, "rows": min(shard_rows, n_pairs - start),
                       "bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)})
    reasons = ["empty chosen completion", "prompt longer than max_prompt_length", "chosen equals rejected"]
    rej = pa.table(
        {
            "source_index": np.arange(n_rejected, dtype=np.int64) * 7 + 3,
            "source_file": ["synthetic.jsonl"] * n_rejected,
            "reason": [reasons[i % len(reasons) if i < 3 else 0] for i in range(n_rejected)],
        },
        schema=pa.schema([REJECTED_SCHEMA.field(n) for n in REJECTED_REQUIRED]),  # as written before reason_kind
    )
    rej_path = side_dir(out) / REJECTED_FILE
    rej_path.parent.mkdir(exist_ok=True)
    pq.write_table(rej, rej_path)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": {"path": "synthetic (no model)", "sha256": "0" * 64},
        "tokenization": {"max_length": max_len},
        "backend": {"name": "synthetic", **({"settings": {"ches": CHES_COMPUTED}} if ches else {})},
        "dataset": {"source": "synthetic", "rows_read": n_pairs + n_rejected, "rows_kept": n_pairs,
                    "rows_rejected": n_rejected},
        "shards": shards,
        "fingerprint": hashlib.sha256(f"synthetic:{seed}:{n_pairs}".encode()).hexdigest(),
    }
    manifest_path(out).parent.mkdir(exist_ok=True)
    manifest_path(out).write_text(json.dumps(manifest, indent=1))
    return table


def _probe_drift(t, near, ldiff, u, v, collapse_at):
    """Policy - reference log-prob (chosen, rejected) at training fraction t (arrays broadcast)."""
    late = np.maximum(t - collapse_at, 0.0)
    chosen = 3.0 * t * (1 - near) * (0.5 + u) - 6.0 * t * near * (0.5 + u) - 25.0 * late
    rejected = -6.0 * t * (0.5 + v) - 16.0 * t * near * (0.5 + v) - 30.0 * late - 1.0 * t * ldiff
    return chosen, rejected


def make_run(out, train_pairs, eval_pairs=None, *, name=None, beta=0.1, loss="sigmoid", lr=5e-6, steps=200,
             batch_size=8, probe_every=10, n_probe=32, seed=0, collapse_at=0.6, noise=0.3, noise0=1e-6,
             learn=1.0, steps_per_file=None, cache_paths=(None, None)):
    """Write a stage-2-shaped run directory at `out` from cache tables `train_pairs` (and `eval_pairs`).

    Probes: the first `n_probe` pairs of each cache at steps 0, probe_every, ..., steps (scored after s
    updates; step 0 = the reference: rewards are float noise of size `noise0`). Train rows: `batch_size` random
    train pairs per step 0..steps-1. `learn` scales the systematic drift (0 = none: only `noise` per pair).
    Returns the number of example rows written.
    """
    rng = np.random.default_rng(seed + 1000)
    out = Path(out)
    (out / "examples").mkdir(parents=True, exist_ok=True)
    run_id = name or out.name

    def pair_arrays(tab):
        cl = tab.column("chosen_len").to_numpy().astype(np.float64)
        rl = tab.column("rejected_len").to_numpy().astype(np.float64)
        sp = tab.column("shared_prefix_len").to_numpy()
        near = (sp >= 0.5 * np.minimum(cl, rl)).astype(np.float64)
        n = len(tab)
        return {
            "pair_id": tab.column("pair_id").combine_chunks(),
            "ref_c": tab.column("ref_chosen_logp").to_numpy(),
            "ref_r": tab.column("ref_rejected_logp").to_numpy(),
            "cl": cl.astype(np.int32), "rl": rl.astype(np.int32),
            "near": near, "ldiff": (cl - rl) / 10.0, "u": rng.random(n), "v": rng.random(n),
        }

    tr = pair_arrays(train_pairs)
    n_train = len(tr["ref_c"])
    ev = pair_arrays(eval_pairs) if eval_pairs is not None else None
    probe_sets = [("train", tr, np.arange(min(n_probe, len(tr["ref_c"]))))]
    if ev is not None:
        probe_sets.append(("eval", ev, np.arange(min(n_probe, len(ev["ref_c"])))))

    def rows(arr, idx, step, t, source, split, zero=False):
        n = len(idx)
        if zero:
            dc, dr = noise0 * rng.standard_normal(n), noise0 * rng.standard_normal(n)
        else:
            dc, dr = _probe_drift(t, arr["near"][idx], arr["ldiff"][idx], arr["u"][idx], arr["v"][idx],
                                  collapse_at)
            dc = learn * dc + noise * rng.standard_normal(n)
            dr = learn * dr + noise * rng.standard_normal(n)
        cr, rr = beta * dc, beta * dr
        margin = cr - rr
        return {
            "step": np.full(n, step, np.int64), "epoch": np.full(n, step * batch_size / n_train, np.float64),
            "source": source, "split": split, "idx": idx, "arr": arr,
            "policy_chosen_logp": arr["ref_c"][idx] + dc, "policy_rejected_logp": arr["ref_r"][idx] + dr,
            "ref_chosen_logp": arr["ref_c"][idx], "ref_rejected_logp": arr["ref_r"][idx],
            "chosen_reward": cr, "rejected_reward": rr, "margin": margin,
            "loss": np.logaddexp(0.0, -margin),
        }

    def to_table(chunks):
        n = sum(len(c["step"]) for c in chunks)
        cols = {k: np.concatenate([c[k] for c in chunks]) for k in (
            "step", "epoch", "policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp",
            "ref_rejected_logp", "chosen_reward", "rejected_reward", "margin", "loss")}
        pid = pa.concat_arrays([c["arr"]["pair_id"].take(pa.array(c["idx"])) for c in chunks])
        return pa.table(
            {
                "run_id": pa.array([run_id] * 1, pa.string()).take(pa.array(np.zeros(n, np.int64))),
                "step": cols["step"], "epoch": cols["epoch"],
                "source": pa.DictionaryArray.from_arrays(
                    np.concatenate([np.full(len(c["step"]), c["source"] == "probe", np.int8) for c in chunks]),
                    ["train", "probe"]).cast(pa.string()),
                "split": pa.DictionaryArray.from_arrays(
                    np.concatenate([np.full(len(c["step"]), c["split"] == "eval", np.int8) for c in chunks]),
                    ["train", "eval"]).cast(pa.string()),
                "pair_id": pid,
                **{k: cols[k] for k in ("policy_chosen_logp", "policy_rejected_logp", "ref_chosen_logp",
                                        "ref_rejected_logp", "chosen_reward", "rejected_reward", "margin",
                                        "loss")},
                "chosen_len": np.concatenate([c["arr"]["cl"][c["idx"]] for c in chunks]),
                "rejected_len": np.concatenate([c["arr"]["rl"][c["idx"]] for c in chunks]),
            },
            schema=EXAMPLES_SCHEMA,
        )

    steps_per_file = steps_per_file or steps + 1
    step_rows, chunks, part, total = [], [], 0, 0
    for s in range(steps + 1):
        t = s / steps
        if (probe_every and s % probe_every == 0) or s == steps:  # 0: only at the end, as `refcache train`
            for split, arr, idx in probe_sets:
                chunks.append(rows(arr, idx, s, t, "probe", split, zero=(s == 0)))
        if s < steps:  # the batch of step s, computed before update s
            idx = rng.integers(0, n_train, batch_size)
            b = rows(tr, idx, s, t, "train", "train", zero=(s == 0))
            chunks.append(b)
            step_rows.append({
                "run_id": run_id, "step": s, "epoch": s * batch_size / n_train, "lr": lr * min(1.0, (s + 1) / 10),
                "loss": float(b["loss"].mean()), "grad_norm": float(1.0 + rng.random()),
                "reward_chosen": float(b["chosen_reward"].mean()),
                "reward_rejected": float(b["rejected_reward"].mean()),
                "reward_margin": float(b["margin"].mean()),
                "reward_accuracy": float((b["margin"] > 0).mean()),
                "policy_chosen_logp": float(b["policy_chosen_logp"].mean()),
                "policy_rejected_logp": float(b["policy_rejected_logp"].mean()),
                "ref_chosen_logp": float(b["ref_chosen_logp"].mean()),
                "ref_rejected_logp": float(b["ref_rejected_logp"].mean()),
                "tokens": int((tr["cl"][idx] + tr["rl"][idx]).sum()), "seconds": 0.5,
                "samples_per_s": batch_size / 0.5,
            })
        if (s + 1) % steps_per_file == 0 or s == steps:
            if chunks:
                tab = to_table(chunks)
                pq.write_table(tab, out / "examples" / f"part-{part:05d}.parquet", compression="zstd")
                total += len(tab)
                part += 1
            chunks = []
    pq.write_table(pa.Table.from_pylist(step_rows, schema=STEPS_SCHEMA), out / "steps.parquet",
                   compression="zstd")
    config = {"run_id": run_id, "loss": loss, "beta": beta, "lr": lr, "steps": steps, "batch_size": batch_size,
              "probe_every": probe_every, "n_probe": n_probe, "seed": seed,
              "cache": cache_paths[0] and os.path.abspath(cache_paths[0]),
              "eval_cache": cache_paths[1] and os.path.abspath(cache_paths[1]), "synthetic": True}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    last = step_rows[-1]
    (out / "summary.json").write_text(json.dumps({"steps": steps, "final_loss": last["loss"],
                                                  "final_reward_accuracy": last["reward_accuracy"]}))
    return total


def make_world(root, *, n_train=200, n_eval=60, runs=(("beta0.1", 0.1),), seed=0, **run_kw):
    """A train cache, an eval cache and one run per (name, beta) under `root`. Returns their paths."""
    root = Path(root)
    train = make_cache(root / "cache", n_train, seed=seed)
    ev = make_cache(root / "eval_cache", n_eval, seed=seed + 1, n_rejected=2)
    run_dirs = []
    for k, (name, beta) in enumerate(runs):
        make_run(root / "runs" / name, train, ev, beta=beta, seed=seed + k,
                 cache_paths=(root / "cache", root / "eval_cache"), **run_kw)
        run_dirs.append(root / "runs" / name)
    return {"cache": root / "cache", "eval_cache": root / "eval_cache", "runs": run_dirs}
