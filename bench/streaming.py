"""Benchmark: stage 1 streams, so its memory stays flat as the input grows (20k vs 200k short pairs).

For each size N, writes N short synthetic pairs (explicit-prompt JSONL, each field a few words) under `--work`
(default bench/work/streaming, reused when present), then runs `refcache precompute` on them (hf backend,
float32, data/tiny-llama) in a child process, into a fresh cache directory. Measured per size: the child's
peak RSS (os.wait4's rusage of that one child), an RSS timeline (VmRSS every 0.5 s), wall seconds, tokens
(prompt + chosen + rejected, from the cache's manifest) per second, cache rows and part files.

    .venv/bin/python bench/streaming.py                 # 20,000 and 200,000 pairs
    .venv/bin/python bench/streaming.py --quick         # 500 and 5,000 pairs, under bench/work/quick/streaming
    .venv/bin/python bench/streaming.py --sizes 1000,10000 --threads 1 --json /tmp/streaming.json
"""

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.synthetic import NAMES, WORDS

MODEL = ROOT / "data" / "tiny-llama"


def write_pairs(path: Path, n, seed=0):
    """n short explicit-prompt pairs, one JSON line at a time (reused if the file already exists)."""
    if path.exists():
        return path
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for _ in range(n):
            a, b, c, d = rng.sample(WORDS, 4)
            rec = {
                "prompt": f"{rng.choice(NAMES)}: where is the {a}?",
                "chosen": f" The {a} is by the {b}.",
                "rejected": f" A {c} and a {d}.",
            }
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)  # a file under the final name is always complete
    return path


def vm_rss(pid):
    """The process's resident set in bytes, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def downsample(points, most=200):
    step = max(1, -(-len(points) // most))
    return points[::step]


def run_precompute(data, out, log, threads=None, every=0.5):
    """`refcache precompute` in a child; returns (wall s, peak RSS bytes, [[t, bytes], ...], its JSON summary)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)  # torch's default intra-op threads
    argv = [sys.executable, "-m", "refcache.cli", "precompute", str(data), "--model", str(MODEL)]
    argv += ["--out", str(out), "--backend", "hf", "--dtype", "float32", "--no-progress", "--json"]
    timeline, done = [], threading.Event()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        to_log = [(os.POSIX_SPAWN_DUP2, f.fileno(), 1), (os.POSIX_SPAWN_DUP2, f.fileno(), 2)]
        pid = os.posix_spawn(argv[0], argv, env, file_actions=to_log)

        def sample():
            while not done.is_set():
                rss = vm_rss(pid)
                if rss is not None:
                    timeline.append([round(time.perf_counter() - t0, 2), rss])
                done.wait(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(pid, 0)  # rusage of this child only (RUSAGE_CHILDREN is the max over all)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    lines = Path(log).read_text().splitlines()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"precompute failed ({log}): {lines[-1] if lines else 'no output'}")
    summary = next((json.loads(x) for x in reversed(lines) if x.startswith("{")), {})  # --json's summary line
    return wall, usage.ru_maxrss * 1024, downsample(timeline), summary


def measure(n, work: Path, threads=None):
    data = write_pairs(work / f"pairs-{n}.jsonl", n)
    out = work / f"cache-{n}"
    wall, peak, timeline, summary = run_precompute(data, out, work / f"precompute-{n}.log", threads)
    from pipeline.cache import read_manifest

    manifest = read_manifest(out)
    tokens = sum(manifest["tokens"].values())  # prompt + chosen + rejected, each counted once
    return {
        "pairs": n,
        "peak_rss_bytes": peak,
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "score_tokens_per_s": summary.get("tokens_per_s"),
        "rows": manifest["dataset"]["rows_kept"],
        "parts": len(manifest["shards"]),
        "part_size": manifest["settings"]["part_size"],
        "rss_timeline": timeline,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="comma-separated pair counts (default 20000,200000)")
    ap.add_argument("--quick", action="store_true", help="500,5000 pairs under bench/work/quick/streaming")
    ap.add_argument("--work", default=None, help="work directory (default bench/work[/quick]/streaming)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    ap.add_argument("--json", default=None, help="where to write the figures (default <work>/streaming.json)")
    args = ap.parse_args()
    sizes = [int(x) for x in (args.sizes or ("500,5000" if args.quick else "20000,200000")).split(",")]
    work = Path(args.work or ROOT / "bench" / "work" / ("quick" if args.quick else "") / "streaming")
    work.mkdir(parents=True, exist_ok=True)

    runs = []
    for n in sizes:
        print(f"precompute over {n:,} pairs ...", flush=True)
        r = measure(n, work, args.threads)
        runs.append(r)
        print(
            f"  peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB, {r['wall_s']:.1f} s, "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['rows']:,} rows in {r['parts']} parts",
            flush=True,
        )

    small, large = min(runs, key=lambda r: r["pairs"]), max(runs, key=lambda r: r["pairs"])
    out = {
        "sizes": sizes,
        "runs": runs,
        "model": str(MODEL.relative_to(ROOT)),
        "backend": "hf",
        "dtype": "float32",
        "threads": args.threads,
        "peak_rss_ratio_largest_over_smallest": large["peak_rss_bytes"] / small["peak_rss_bytes"],
    }
    if {small["pairs"], large["pairs"]} == {20_000, 200_000}:
        out["stream_peak_rss_200k_over_20k"] = out["peak_rss_ratio_largest_over_smallest"]

    print("\n| pairs | peak RSS MiB | wall s | tokens | tokens/s | rows | parts |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['pairs']:,} | {r['peak_rss_bytes'] / 2**20:,.0f} | {r['wall_s']:.1f} | {r['tokens']:,} | "
            f"{r['tokens_per_s']:,.0f} | {r['rows']:,} | {r['parts']} |"
        )
    print(
        f"peak RSS {large['pairs']:,} / {small['pairs']:,} pairs: "
        f"{out['peak_rss_ratio_largest_over_smallest']:.3f}"
    )
    path = Path(args.json or work / "streaming.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"figures -> {path}")


if __name__ == "__main__":
    main()
