"""Where the time goes, for the two targets that sit at a bound (BENCHMARKS.md, "Notes").

    .venv/bin/python bench/where_time_goes.py          # needs bench/work/ from `make bench` (the workload model and pairs)

1. Stage 1, hf backend, bf16, eager and --compile: torch profiler over scoring 64 pairs at the benchmark's batch
   size; time per op group (matmul, attention, the rest). MFU can only approach the matmul rate if matmuls are
   nearly all of the time.
2. Stage 2, fp32, length-grouped batches of 8 pairs, through the trainer's own setup/score/train_step: the
   seconds of a no-grad forward (what --live-ref adds) and of a whole step (forward + backward + optimizer). The
   cache saves the first; the ratio cached / live is step / (step + no-grad forward).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from torch.profiler import profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "work"


def groups(prof):
    total, out = 0.0, {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6
        total += t
        key = "matmul" if e.key in ("aten::mm", "aten::bmm", "aten::addmm", "mkldnn::_linear_pointwise") else (
            "attention" if "attention" in e.key else "other")
        out[key] += t
    return {k: v / total for k, v in out.items()}, total


def stage1(model, pairs_path, n=64, timed=256, rounds=3):
    from transformers import AutoTokenizer

    from pipeline.backends import HFScorer

    tok = AutoTokenizer.from_pretrained(model)
    with open(pairs_path) as f:
        rows = [json.loads(line) for line in f][:timed]
    triples = [(tok(r["prompt"])["input_ids"], tok(r["chosen"], add_special_tokens=False)["input_ids"],
                tok(r["rejected"], add_special_tokens=False)["input_ids"]) for r in rows]
    tokens = sum(len(p) + len(c) + len(r) for p, c, r in triples)
    scorers = {name: HFScorer(model, "bfloat16", batch_size=8, compile=name == "--compile")  # bench's batch
               for name in ("eager", "--compile")}
    for name, scorer in scorers.items():
        scorer.score_pairs(triples[:8])  # warm-up
        with profile() as prof:
            scorer.score_pairs(triples[:n])
        share, total = groups(prof)
        print(f"stage 1, hf bf16 {name}, {n} pairs: " + ", ".join(f"{k} {v:.0%}" for k, v in share.items())
              + f" of {total:.2f} s op time")
    # eager and compiled in turns over the same pairs, so machine noise hits both alike
    rates = {name: [] for name in scorers}
    for _ in range(rounds):
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            scorer.score_pairs(triples)
            rates[name].append(tokens / (time.perf_counter() - t0))
    print(f"stage 1, hf bf16, {len(triples)} pairs, {rounds} alternating rounds: " + ", ".join(
        f"{name} {np.median(r):,.0f} tokens/s (runs {', '.join(f'{x:,.0f}' for x in r)})" for name, r in rates.items()))


def stage2(model, cache, steps=3):
    """The trainer's own pieces (dpo.train): a no-grad forward of a step's batch through `score` (what --live-ref
    adds per step), then `train_step` on that batch (forward + backward + optimizer)."""
    import tempfile

    from dpo.train import TrainConfig, score, setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(cache=cache, out=os.path.join(tmp, "run"), model=model, batch_size=8, lr=1e-6,
                          steps=steps, probe_size=0, save_final=False, progress=False)
        with setup(cfg) as run:
            fwd, step = [], []
            for s in range(steps):
                t0 = time.perf_counter()
                score(run, run.train_pairs, run.batch(s))
                fwd.append(time.perf_counter() - t0)
                step.append(train_step(run, s).seconds)
    fwd, st = float(np.median(fwd)), float(np.median(step))
    print(f"stage 2, fp32, 8 pairs: no-grad forward {fwd:.3f} s, train_step (forward + backward + optimizer) "
          f"{st:.3f} s ({st / fwd:.2f} forwards); cached/live bound {st / (st + fwd):.3f}")


if __name__ == "__main__":
    model = WORK / "workload" / "model"
    stage1(str(model), WORK / "workload" / "pairs.jsonl")
    cache = next((WORK / "train").glob("cache-*"))
    stage2(str(model), str(cache))
