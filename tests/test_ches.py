"""CHES (pipeline/ches.py) from stage 1's shared-prompt forward equals the paper's formula computed directly from
`model(..., output_hidden_states=True)` on each completion as its own unpacked sequence, on the embedded model
and on SmolLM2; the cache carries it, and says so in its manifest."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.backends import HFScorer


def _direct(model, prompt, chosen, rejected):
    """(ches, ln_ches) in fp64 from two separate forwards: h = the last entry of output_hidden_states (the LM
    head's input) at the positions predicting each completion token."""
    def hs(completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            h = model(ids, output_hidden_states=True).hidden_states[-1][0].double()
        return h[len(prompt) - 1 : len(prompt) + len(completion) - 1]

    hp, hn = hs(chosen), hs(rejected)
    assert hp.shape[0] == len(chosen) and hn.shape[0] == len(rejected)
    sp, sn, mp, mn = hp.sum(0), hn.sum(0), hp.mean(0), hn.mean(0)
    # the size of the two dot products that cancel (|a||b| bounds a dot product's rounding): tolerance is
    # relative to it, as fp32 kernels of another CPU round differently
    scale = tuple((a.norm() * (a.norm() + b.norm())).item() for a, b in ((sp, sn), (mp, mn)))
    return (sp @ sn - sp @ sp).item(), (mp @ mn - mp @ mp).item(), scale


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
        want, want_ln, (scale, scale_ln) = _direct(scorer.model, p, c, r)
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
    from pipeline.ches import missing_reason

    manifest = read_manifest(train_cache)
    assert manifest["backend"]["settings"]["ches"] == "computed" and missing_reason(manifest) is None
    t = pq.read_table(min(train_cache.glob("part-*.parquet"))).to_pylist()
    assert all(r["ches"] is not None and r["ln_ches"] is not None for r in t)
    model = HFScorer(tiny_model_dir, "float32").model
    for r in t[:: max(1, len(t) // 6)]:
        want, want_ln, (scale, scale_ln) = _direct(model, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
        assert abs(r["ches"] - want) <= 1e-5 * scale and abs(r["ln_ches"] - want_ln) <= 1e-5 * scale_ln


@pytest.mark.parametrize("manifest, why", [
    ({"schema_version": 1, "backend": {"name": "hf"}}, "cache schema 1"),
    ({"schema_version": 2, "backend": {"name": "vllm", "settings": {"ches": "not computed"}}}, "vllm backend"),
    ({"schema_version": 2, "backend": {"name": "hf", "settings": {}}}, "hf backend before"),
])
def test_missing_reason_names_the_cause(manifest, why):
    from pipeline.ches import missing_reason

    line = missing_reason(manifest)
    assert line.startswith("no CHES in this cache: ") and why in line and line.endswith("rebuild with --backend hf")
