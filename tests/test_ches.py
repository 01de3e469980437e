"""CHES (pipeline/ches.py) from stage 1's shared-prompt forward equals the paper's formula computed directly from
`model(..., output_hidden_states=True)` on each completion as its own unpacked sequence, on the embedded model
and on SmolLM2; the cache carries it, and says so in its manifest."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from oracles import direct_ches

from pipeline.backends import HFScorer


def _triples(vocab, seed):
    rng = np.random.default_rng(seed)
    lens = ((9, 4, 6), (5, 7, 3), (3, 1, 12), (12, 8, 8))  # different lengths: padding inside a batch
    out = [tuple(rng.integers(100, vocab - 1, n).tolist() for n in ls) for ls in lens]
    return out


def _check(model_dir, vocab):
    scorer = HFScorer(model_dir, "float32", batch_size=4)  # two forwards of two pairs each
    triples = _triples(vocab, 0)
    got = scorer.score_pairs(triples)
    for (p, c, r), (_, _, ches, ln_ches) in zip(triples, got):
        want, want_ln, (scale, scale_ln) = direct_ches(scorer.model, p, c, r)
        assert abs(ches - want) <= 1e-5 * scale, (ches, want, scale)
        assert abs(ln_ches - want_ln) <= 1e-5 * scale_ln, (ln_ches, want_ln, scale_ln)
    return scorer, triples, got


def test_ches_matches_direct_hidden_states_tiny(tiny_model_dir):
    _, triples, got = _check(tiny_model_dir, 1420)
    # a bf16 reference: CHES from bf16 hidden states, summed in fp32; same ranking, values within bf16 rounding
    b16 = HFScorer(tiny_model_dir, "bfloat16", batch_size=4).score_pairs(triples)
    assert np.argsort([x[3] for x in b16]).tolist() == np.argsort([x[3] for x in got]).tolist()
    for x, y in zip(b16, got):
        assert isinstance(x[3], float) and abs(x[3] - y[3]) <= 0.05 * max(1.0, abs(y[3]))


def test_ches_matches_direct_hidden_states_smollm2(smollm2_dir):
    _check(smollm2_dir, 49152)


def test_cache_has_ches_from_the_hf_backend(train_cache, tiny_model_dir):
    """The session cache (hf backend) carries ches/ln_ches for every pair, equal to the direct computation on
    a sample, and its manifest records that it was computed."""
    from pipeline.cache import read_manifest
    from refcache_base.cache_schema import ches_missing_reason

    manifest = read_manifest(train_cache)
    assert manifest["backend"]["settings"]["ches"] == "computed" and ches_missing_reason(manifest) is None
    t = pq.read_table(min(train_cache.glob("part-*.parquet"))).to_pylist()
    assert all(r["ches"] is not None and r["ln_ches"] is not None for r in t)
    model = HFScorer(tiny_model_dir, "float32").model
    for r in t[:: max(1, len(t) // 6)]:
        want, want_ln, (scale, scale_ln) = direct_ches(model, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
        assert abs(r["ches"] - want) <= 1e-5 * scale and abs(r["ln_ches"] - want_ln) <= 1e-5 * scale_ln


def test_sequence_ches_takes_the_positions_predicting_each_completion_token(tiny_model_dir):
    """The vllm backend's route to pipeline/ches.py: full-sequence hidden states of prompt + chosen and prompt +
    rejected (here from hf's own forward, as vLLM's pooling engine returns them) give the direct CHES."""
    import torch

    from pipeline.ches import sequence_ches

    model = HFScorer(tiny_model_dir, "float32").model
    triples = _triples(1420, 1)
    hidden, starts = [], []
    for p, c, r in triples:
        for completion in (c, r):
            with torch.no_grad():
                hidden.append(model(torch.tensor([p + completion]), output_hidden_states=True).hidden_states[-1][0])
            starts.append(len(p))
    for (p, c, r), (ches, ln_ches) in zip(triples, sequence_ches(hidden, starts)):
        want, want_ln, (scale, scale_ln) = direct_ches(model, p, c, r)
        assert abs(ches - want) <= 1e-5 * scale and abs(ln_ches - want_ln) <= 1e-5 * scale_ln


@pytest.mark.parametrize("manifest, why, fix", [
    ({"schema_version": 1, "backend": {"name": "hf"}}, "cache schema 1", "rebuild with --backend hf"),
    ({"schema_version": 2, "backend": {"name": "vllm", "settings": {"ches": "not computed (vLLM returns no hidden "
                                                                            "states)"}}},
     "vllm backend before refcache computed CHES with it", "rebuild it"),
    ({"schema_version": 2, "backend": {"name": "vllm", "settings": {"ches": "not computed (--no-ches)",
                                                                    "ches_method": None}}},
     "vllm backend and --no-ches", "rebuild without --no-ches"),
    ({"schema_version": 2, "backend": {"name": "hf", "settings": {}}}, "hf backend before", "rebuild it"),
    ({"schema_version": 2, "backend": {"name": "hf", "settings": {"ches": "not computed (no shared-prompt layout "
                                                                          "for this model)"}}},
     "packs no pair of this model", "rebuild with --backend vllm"),
    ({"schema_version": 2, "backend": {"name": "synthetic", "settings": {}}}, "synthetic backend",
     "rebuild with --backend hf"),
])
def test_ches_missing_reason_names_the_cause(manifest, why, fix):
    from refcache_base.cache_schema import ches_missing_reason

    line = ches_missing_reason(manifest)
    assert line.startswith("no CHES in this cache: ") and why in line and line.endswith(fix), line
