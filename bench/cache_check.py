"""Benchmark: what checking a cache's parts (size + sha256 against the manifest) costs readers.

Measures, on a real cache directory (`--cache`) or a synthetic one in the stage-1 schema (`--pairs N`, written
by tests/synth.py's make_cache with long sequences, one part per 10,000 pairs):
  full    pipeline.cache.check_parts(full=True): every part hashed (what verify, merge and resume do), in MB/s
  memo    check_parts() with the memo fresh: only stat() per part (what training and queries do)
  train   dpo.data.load_pairs (check + read the training columns)
  query   queries.connect + the cache_overview diagnostic

    .venv/bin/python bench/cache_check.py --cache CACHE
    .venv/bin/python bench/cache_check.py --pairs 100000 --max-len 1024
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # synth: the test fixture's caches

from pipeline import cache


def best_of(fn, rounds=3):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="an existing cache (read only; the memo is refreshed)")
    ap.add_argument("--pairs", type=int, default=100_000, help="synthetic cache size when no --cache")
    ap.add_argument("--max-len", type=int, default=1024, help="synthetic: longest completion in tokens")
    args = ap.parse_args()
    from dpo.data import load_pairs
    from queries import connect, run_query

    tmp = None
    if args.cache:
        d = Path(args.cache)
    else:
        from synth import make_cache

        tmp = Path(tempfile.mkdtemp(prefix="cache_check-"))
        d = tmp / "cache"
        make_cache(d, args.pairs, seed=0, shard_rows=10_000, max_len=args.max_len)
    try:
        manifest = cache.read_manifest(d)
        size = sum((d / s["file"]).stat().st_size for s in manifest["shards"])
        time.sleep(cache.RACY_NS / 1e9 + 0.1)  # parts older than the memo's racy window
        full = best_of(lambda: cache.check_parts(d, full=True))  # also records the memo
        memo = best_of(lambda: cache.check_parts(d))
        train = best_of(lambda: load_pairs(str(d)), rounds=1)
        query = best_of(lambda: run_query(connect([], caches=[d]), "cache_overview"), rounds=1)
        out = {"cache": str(d) if args.cache else f"synthetic {args.pairs:,} pairs, max_len {args.max_len}",
               "pairs": manifest["dataset"]["rows_kept"], "parts": len(manifest["shards"]), "bytes": size,
               "full_check_s": full, "full_check_mb_per_s": size / 2**20 / full, "memo_check_s": memo,
               "load_pairs_s": train, "query_s": query}
        print(json.dumps(out, indent=1))
    finally:
        if tmp:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
