"""The eval pass (--eval-every N): every pair of the eval cache scored at steps 0, N, 2N, ... and at the end, TRL's
eval metrics in evals.parquet, the pair count in the summary; its numbers are the means of the per-pair values
the probes log for the same pairs."""

import math
import os

import numpy as np
import pyarrow.parquet as pq

from dpo.train import TrainConfig, train
from refcache_base.runlog_schema import EVALS_SCHEMA


def test_eval_pass_scores_the_whole_eval_cache(tmp_path, train_cache, eval_cache):
    out = tmp_path / "run"
    s = train(TrainConfig(cache=str(train_cache), eval_cache=str(eval_cache), out=str(out), steps=7, eval_every=3,
                          probe_every=3, probe_size=1000, batch_size=4, lr=1e-3, progress=False, threads=1,
                          save_final=False))
    evals = pq.read_table(out / "evals.parquet")
    assert evals.schema.equals(EVALS_SCHEMA)
    ev = evals.to_pylist()
    assert [r["step"] for r in ev] == [0, 3, 6, 7] and {r["pairs"] for r in ev} == {64}
    assert s["eval_pairs"] == 64 and s["eval"]["pairs"] == 64 and s["eval"]["step"] == 7
    assert s["eval"]["loss"] == ev[-1]["loss"]
    # at step 0 the policy is the reference: ln 2, zero rewards, log-probs equal to the cache's
    assert abs(ev[0]["loss"] - math.log(2)) < 1e-5 and abs(ev[0]["reward_margin"]) < 1e-6
    # every pair's margin is 0 up to float noise (the cache was scored in other batches than the eval pass, so its
    # last bits may differ: a margin of +1e-9 counts as "accurate", hence no exact accuracy of 0 here)
    ex0 = pq.read_table(os.path.join(out, "examples")).to_pandas()
    assert np.abs(ex0[(ex0.step == 0) & (ex0.split == "eval")].margin).max() < 1e-5
    assert abs(ev[0]["policy_chosen_logp"] - ev[0]["ref_chosen_logp"]) < 1e-4
    assert ev[-1]["loss"] != ev[0]["loss"]  # and it moves with training
    # the probe subset holds every eval pair (probe_size >= 64): its per-pair rows average to the eval row
    ex = pq.read_table(os.path.join(out, "examples")).to_pandas()
    probe = ex[(ex.source == "probe") & (ex.split == "eval")]
    for r in ev:
        rows = probe[probe.step == r["step"]]
        assert len(rows) == 64
        assert abs(rows.loss.mean() - r["loss"]) < 1e-12
        assert abs(rows.margin.mean() - r["reward_margin"]) < 1e-12
        assert abs((rows.margin > 0).mean() - r["reward_accuracy"]) < 1e-12
        assert abs(rows.policy_rejected_logp.mean() - r["policy_rejected_logp"]) < 1e-9
    assert np.isfinite([r["seconds"] for r in ev]).all()
