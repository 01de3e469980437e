"""Exactness of stage 2 on the real model (SmolLM2-135M-Instruct, ChatML, vocab 49,152), fp32: a policy that starts
at the cached reference has loss ln 2 at step 0, and training from the cache gives the same losses, step by step,
as scoring the reference live (--live-ref). Small on purpose: 32 short chat pairs, batch 4, 10 steps."""

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from dpo.train import TrainConfig, train

STEPS = 10


def _chat_rows(prefs_dir, n):
    """The first n embedded pairs as chat rows (ChatML renders them; SmolLM2's template adds its system turn)."""
    rows = []
    with open(prefs_dir / "train.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if isinstance(r["prompt"], str):
                r = {"prompt": [{"role": "user", "content": r["prompt"]}],
                     "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
                     "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
            rows.append({k: r[k] for k in ("prompt", "chosen", "rejected")})
            if len(rows) == n:
                return rows
    return rows


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory, smollm2_dir, prefs_dir):
    from pipeline.precompute import precompute

    root = tmp_path_factory.mktemp("smollm2")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(prefs_dir, 32)))
    precompute(data, smollm2_dir, root / "cache", backend="hf", dtype="float32", progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm2_cache):
    root = tmp_path_factory.mktemp("smollm2-runs")
    out = {}
    for name, live in (("cached", False), ("live", True)):
        cfg = TrainConfig(cache=str(smollm2_cache), out=str(root / name), steps=STEPS, batch_size=4, lr=1e-5,
                          live_ref=live, probe_size=0, checkpoint_every=0, save_final=False, progress=False,
                          threads=int(os.environ.get("REFCACHE_TEST_THREADS", "1")))
        summary = train(cfg)
        out[name] = (summary, pq.read_table(os.path.join(cfg.out, "steps.parquet")).column("loss").to_pylist())
    return out


def test_step0_loss_is_ln2(runs):
    summary, losses = runs["cached"]
    print(f"SmolLM2 step-0 loss - ln 2 = {summary['first_loss'] - math.log(2):.2e}")
    assert abs(summary["first_loss"] - math.log(2)) < 1e-5
    assert abs(losses[0] - math.log(2)) < 1e-5


def test_cached_equals_live_reference(runs):
    cached, live = (np.asarray(runs[k][1]) for k in ("cached", "live"))
    assert len(cached) == len(live) == STEPS
    print(f"SmolLM2 cached vs --live-ref, max |loss difference| over {STEPS} steps = {np.abs(cached - live).max():.2e}")
    assert np.abs(cached - live).max() < 1e-5
    assert np.abs(cached - math.log(2)).max() > 1e-3  # the policy moved: not ten identical ln 2's
