"""Stage-2 memory per process: peak RSS of each rank for 1 process, 2x DDP and 2x FSDP2 (torchrun, gloo, CPU).

  .venv/bin/python bench/fsdp_memory.py --model bench/work/workload/model --data bench/work/workload/pairs.jsonl
  .venv/bin/python bench/fsdp_memory.py        # a random-init Llama of the workload's shape, synthetic pairs

The three configurations train the same steps (global batch, fp32, AdamW) from one cache, built once under
--work with the hf backend. Every process reports its peak RSS over the training loop and the elements it holds
(weights, AdamW state) in the run's summary.json. Also measured: the RSS of a process that has only imported the
trainer (Python, torch, transformers), so the part that sharding can shrink is visible beside the total. The
processes are launched from a small parent: Linux starts a child's peak RSS at its parent's.

glibc's malloc raises its mmap threshold as large blocks are freed, after which freed activations and gradients
stay in the heap and count as RSS although nothing uses them; the measured processes run with a fixed
MALLOC_MMAP_THRESHOLD_ (128 KiB, --mmap-threshold; 0 = glibc's adaptive one) so RSS follows live memory, the same
for all three. On a GPU, where FSDP is used, the caching allocator's peak is what counts (bench/gpu_check.py).

Figure: fsdp2_over_ddp_peak_rss_per_rank = (largest FSDP rank peak) / (largest DDP rank peak).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

MODES = {  # name -> (processes, extra flags)
    "one": (1, []),
    "ddp2": (2, ["--parallel", "ddp"]),
    "fsdp2": (2, ["--parallel", "fsdp"]),
}


def prepare(args) -> dict:
    """The model, pairs and cache (built once under --work, reused). Runs in a child process (--prepare): a child
    starts with its parent's RSS as its own peak (Linux carries ru_maxrss over fork and exec), so the process
    that launches the measured ones must stay small."""
    import train as bench_train  # bench/train.py: its model and pairs builders

    from pipeline.cache import is_cache
    from pipeline.precompute import precompute

    model = os.path.abspath(args.model) if args.model else bench_train.build_model(
        os.path.join(args.work, "llama-h512-l9"), 512, 9, 1408, os.path.join(ROOT, "data", "tiny-llama"))
    data = os.path.abspath(args.data) if args.data else bench_train.build_data(
        os.path.join(args.work, f"pairs-{args.pairs}.jsonl"), args.pairs, 128, 128)
    cache = os.path.join(args.work, "cache")
    if not is_cache(cache):
        precompute(data, model, cache, backend="hf", dtype="float32", limit=args.pairs, max_length=args.max_length,
                   max_prompt_length=min(512, args.max_length // 2), progress=False)
    return {"model": model, "data": data, "cache": cache}


def import_rss(env) -> int:
    """Peak RSS of a process that imports the trainer and does nothing else."""
    code = "import resource, dpo.train; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return int(r.stdout.split()[-1])


def run_mode(name, cache, model, work, args, env):
    procs, extra = MODES[name]
    out = os.path.join(work, "runs", name + ("-ckpt" if args.grad_checkpointing else ""))
    shutil.rmtree(out, ignore_errors=True)
    launcher = [sys.executable, "-m", "refcache.cli"] if procs == 1 else \
        [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", str(procs),
         "-m", "refcache.cli"]
    cmd = [*launcher, "train", "--cache", cache, "--model", model, "--out", out, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--lr", "1e-6", "--probe-size", "0", "--checkpoint-every", "0",
           "--threads", str(args.threads), "--no-progress", *extra,
           *(["--grad-checkpointing"] if args.grad_checkpointing else [])]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    return {"processes": procs, "peak_rss_bytes_per_rank": s["peak_rss_bytes_per_rank"],
            "shards_per_rank": s["shards_per_rank"], "step_seconds_median": s["step_seconds_median"],
            "wall_s": time.perf_counter() - t0, "first_loss": s["first_loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face model dir (make bench: the workload's ~30M Llama; default: a "
                    "random-init Llama of that shape, built by bench/train.py)")
    ap.add_argument("--data", help="preference pairs, JSONL (default: bench/train.py's synthetic pairs)")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "work", "fsdp_memory"))
    ap.add_argument("--json", default=None, help="write the figures here (default WORK/fsdp_memory.json)")
    ap.add_argument("--pairs", type=int, default=256, help="pairs in the cache")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--grad-checkpointing", action="store_true", help="all three with activation checkpointing")
    ap.add_argument("--mmap-threshold", type=int, default=131072,
                    help="glibc MALLOC_MMAP_THRESHOLD_ of the measured processes (0 = glibc's own, adaptive)")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    if args.prepare:
        print(json.dumps(prepare(args)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT}
    if args.mmap_threshold:  # see the module doc
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    base = import_rss(env)
    r = subprocess.run([sys.executable, __file__, "--prepare", *sys.argv[1:]], capture_output=True, text=True,
                       env=env, cwd=ROOT, check=False)
    if r.returncode != 0:
        raise SystemExit(f"preparing the model, pairs and cache failed: {r.stderr.strip().splitlines()[-1:]}")
    built = json.loads(r.stdout.strip().splitlines()[-1])
    model, cache = built["model"], built["cache"]
    res = {name: run_mode(name, cache, model, args.work, args, env) for name in MODES}
    peak = {name: max(r["peak_rss_bytes_per_rank"]) for name, r in res.items()}
    out = {
        "model": model,
        "params": res["one"]["shards_per_rank"][0]["param_elements"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "pairs": args.pairs,
        "threads_per_process": args.threads,
        "grad_checkpointing": args.grad_checkpointing,
        "malloc_mmap_threshold": args.mmap_threshold or None,
        "import_rss_bytes": base,
        "modes": res,
        "peak_rss_per_rank_bytes": peak,
        "fsdp2_over_ddp_peak_rss_per_rank": peak["fsdp2"] / peak["ddp2"],
        "fsdp2_over_ddp_peak_rss_above_import": (peak["fsdp2"] - base) / (peak["ddp2"] - base),
    }
    path = args.json or os.path.join(args.work, "fsdp_memory.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    mib = 2**20
    print(f"model {out['params'] / 1e6:.1f}M params, batch {args.batch_size}, {args.steps} steps, fp32; "
          f"import-only process {base / mib:.0f} MiB")
    print(f"{'mode':<6} {'peak RSS per rank (MiB)':>26} {'weights held per rank':>24} {'s/step':>8}")
    for name, r in res.items():
        rss = ", ".join(f"{b / mib:.0f}" for b in r["peak_rss_bytes_per_rank"])
        held = ", ".join(f"{s['param_elements'] / 1e6:.1f}M" for s in r["shards_per_rank"])
        print(f"{name:<6} {rss:>26} {held:>24} {r['step_seconds_median']:>8.2f}")
    print(f"fsdp2/ddp peak RSS per rank {out['fsdp2_over_ddp_peak_rss_per_rank']:.3f} "
          f"(above the import-only process: {out['fsdp2_over_ddp_peak_rss_above_import']:.3f}); figures: {path}")


if __name__ == "__main__":
    main()
