"""vLLM backend: per-token parity with the hf backend (fp32, within 1e-4 nats) on the embedded data."""

import json

import numpy as np

from pipeline.cache import load_table, read_manifest
from pipeline.precompute import precompute
from refcache.cli import main as cli_main


def per_token_diff(a, b):
    ta, tb = load_table(a), load_table(b)
    assert ta.column("pair_id").to_pylist() == tb.column("pair_id").to_pylist()
    for col in ("prompt_ids", "chosen_ids", "rejected_ids", "truncated"):
        assert ta.column(col).equals(tb.column(col)), col
    diffs = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
             for side in ("chosen", "rejected")
             for x, y in zip(ta.column(f"ref_{side}_token_logps").to_pylist(),
                             tb.column(f"ref_{side}_token_logps").to_pylist())]
    d = np.concatenate(diffs)
    sums = np.abs(np.asarray(ta.column("ref_chosen_logp")) - np.asarray(tb.column("ref_chosen_logp")))
    return d.max(), d.mean(), d.size, sums.max()


def test_vllm_matches_hf_per_token_fp32(tmp_path, vllm_scorer, eval_cache, tiny_model_dir, prefs_dir, capsys):
    out = tmp_path / "vllm_eval"
    s = precompute(prefs_dir / "eval.jsonl", tiny_model_dir, out, dtype="float32", limit=64, progress=False,
                   scorer=vllm_scorer)
    assert s["complete"] and s["backend"] == "vllm"
    m = read_manifest(out)
    assert m["backend"]["name"] == "vllm" and m["backend"]["version"].startswith("vllm")
    # same tokens, same pairs as the hf cache; the values agree per token
    mx, mean, n, sum_mx = per_token_diff(out, eval_cache)
    with capsys.disabled():
        print(f"\nvLLM vs hf, fp32, eval[:64]: {n} tokens, per-token |diff| max {mx:.3g}, mean {mean:.3g}; "
              f"sequence sums max {sum_mx:.3g}")
    assert mx < 1e-4 and sum_mx < 1e-3
    assert read_manifest(eval_cache)["fingerprint"] != m["fingerprint"]  # backend is part of the fingerprint

    # every row format (explicit, conversational, implicit text and chat) through both backends
    imp = tmp_path / "vllm_implicit"
    precompute(prefs_dir / "implicit_sample.jsonl", tiny_model_dir, imp, dtype="float32", progress=False,
               scorer=vllm_scorer)
    ref = tmp_path / "hf_implicit"
    precompute(prefs_dir / "implicit_sample.jsonl", tiny_model_dir, ref, backend="hf", progress=False)
    mx2, _, n2, _ = per_token_diff(imp, ref)
    assert mx2 < 1e-4 and n2 > 0

    capsys.readouterr()
    # `refcache verify` re-scores the vLLM cache with hf and reports the same agreement
    assert cli_main(["verify", str(out), "--sample", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["passed"] and r["cache_backend"] == "vllm" and r["max_abs_diff"] < 1e-4
    with capsys.disabled():
        print(f"refcache verify (vllm cache): max {r['max_abs_diff']:.3g} mean {r['mean_abs_diff']:.3g} "
              f"over {r['tokens']} tokens; implied margin error at beta 0.1: {r['margin_error_max']:.3g}")
