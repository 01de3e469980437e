"""What bf16 costs in exactness, on the embedded default (issue 5, "bf16").

1. per-token difference of a bf16 cache against the fp32 cache (same pairs, hf backend), eager and --compile;
2. the step-0 loss (ideally ln 2) when training from the bf16 cache with the policy in fp32 and in bf16 autocast,
   and from the fp32 cache with a bf16 policy.

  .venv/bin/python bench/bf16.py [--data data/prefs/eval.jsonl] [--json bench/work/bf16.json]
"""

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "data", "tiny-llama"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "prefs", "eval.jsonl"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="refcache-bf16-") as work:
        out = measure(args.model, args.data, work)

    for key, what in (("bf16_cache", "bf16 cache"), ("bf16_compiled_cache", "bf16 cache, --compile")):
        print(f"{what} vs fp32 cache, {out['pairs']} pairs / {out['tokens']:,} tokens: per-token |diff| "
              f"max {out[key + '_token_abs_diff_max']:.3g}, mean {out[key + '_token_abs_diff_mean']:.3g} nats; "
              f"per-completion sum mean {out[key + '_seq_abs_diff_mean']:.3g} nats")
    print("step-0 loss − ln 2 (batch of 32):")
    for k, v in out["step0"].items():
        print(f"  {k:40s} {v['minus_ln2']:+.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def measure(model, data, work) -> dict:
    from dpo.train import TrainConfig, train
    from pipeline.cache import load_table
    from pipeline.precompute import precompute

    caches = {}
    for name, dtype, compile in (("float32", "float32", False), ("bfloat16", "bfloat16", False),
                                 ("bfloat16_compiled", "bfloat16", True)):
        caches[name] = os.path.join(work, name)
        precompute(data, model, caches[name], backend="hf", dtype=dtype, progress=False, compile=compile)
    cols = ["pair_id", "ref_chosen_token_logps", "ref_rejected_token_logps", "ref_chosen_logp", "ref_rejected_logp"]
    f32 = load_table(caches["float32"], cols).to_pydict()
    out = {"pairs": len(f32["pair_id"]), "step0": {}}
    for name, key in (("bfloat16", "bf16_cache"), ("bfloat16_compiled", "bf16_compiled_cache")):
        b16 = load_table(caches[name], cols).to_pydict()
        assert f32["pair_id"] == b16["pair_id"]
        tok = np.abs(np.concatenate([np.asarray(a, np.float64) - np.asarray(b, np.float64)
                                     for k in cols[1:3] for a, b in zip(f32[k], b16[k])]))
        seq = np.abs(np.concatenate([np.asarray(f32[k]) - np.asarray(b16[k]) for k in cols[3:]]))
        out.update({"tokens": int(tok.size), f"{key}_token_abs_diff_max": float(tok.max()),
                    f"{key}_token_abs_diff_mean": float(tok.mean()), f"{key}_seq_abs_diff_mean": float(seq.mean())})
    for cache_dtype, policy_dtype in (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16"),
                                      ("float32", "bfloat16")):
        run = os.path.join(work, f"run-{cache_dtype}-{policy_dtype}")
        cfg = TrainConfig(cache=caches[cache_dtype], out=run, steps=1, batch_size=32, dtype=policy_dtype,
                          probe_size=0, save_final=False, progress=False, allow_mismatch=True)
        loss0 = train(cfg)["first_loss"]
        out["step0"][f"cache_{cache_dtype}__policy_{policy_dtype}"] = {"loss": loss0, "minus_ln2": loss0 - math.log(2)}

    return out


if __name__ == "__main__":
    sys.exit(main())
