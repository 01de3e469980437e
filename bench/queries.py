"""Benchmark: every named diagnostic on ~10 million example rows (issue 5: each <= 1.5 s on 2 cores).

Generates synthetic run logs in the exact stage-2 schema (a beta sweep of `--runs` runs over one train and
one eval cache; most rows are probe rows, the expensive case for the per-step quantiles) under `--work`
(default bench/work/queries, gitignored; reused if the row count matches), then times each diagnostic:
one cold run, then the median of `--repeat` warm runs. Prints a table and writes the figures as JSON.

    .venv/bin/python bench/queries.py [--rows 10000000] [--json bench/work/queries.json]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synth: the test fixture's logs

import duckdb
import polars as pl
from synth import make_cache, make_run

import queries

# Parameters a diagnostic needs on synthetic logs: these have no input columns of their own to slice by, so
# `slices` cuts a cache column into ten equal-count bins (the heavier of its two modes).
PARAMS = {"slices": {"by": "chosen_len", "bins": 10}}


def layout(rows, n_runs, n_probe, probe_every, batch_size):
    """Steps per run so that n_runs runs hold ~rows example rows."""
    per_step = 2 * n_probe / probe_every + batch_size
    return max(probe_every, int(rows / n_runs / per_step))


def generate(work: Path, rows, n_runs, n_probe, probe_every, batch_size, steps_per_file):
    steps = layout(rows, n_runs, n_probe, probe_every, batch_size)
    stamp = work / "stamp.json"
    want = {"rows": rows, "runs": n_runs, "n_probe": n_probe, "probe_every": probe_every,
            "batch_size": batch_size, "steps": steps, "steps_per_file": steps_per_file, "ches": True}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return want, [work / "runs" / f"beta{k}" for k in range(n_runs)]
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    # with CHES scores: displacement_risk needs them (it refuses a cache without, as for a user)
    train = make_cache(work / "cache", max(20_000, n_probe * 2), seed=1, shard_rows=10_000, ches=True)
    ev = make_cache(work / "eval_cache", max(4_000, n_probe), seed=2, n_rejected=3, ches=True)
    total, dirs = 0, []
    betas = [0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0]
    for k in range(n_runs):
        d = work / "runs" / f"beta{k}"
        total += make_run(d, train, ev, beta=betas[k % len(betas)], steps=steps, batch_size=batch_size,
                          probe_every=probe_every, n_probe=n_probe, seed=k, steps_per_file=steps_per_file,
                          cache_paths=(work / "cache", work / "eval_cache"))
        dirs.append(d)
        print(f"  generated run {k + 1}/{n_runs}: {total:,} example rows so far "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    want["example_rows"] = total
    stamp.write_text(json.dumps(want))
    return want, dirs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="bench/work/queries")
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--probe-pairs", type=int, default=2048, help="probe pairs per split")
    ap.add_argument("--probe-every", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=96)
    ap.add_argument("--steps-per-file", type=int, default=500, help="examples part file per this many steps")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    ap.add_argument("--json", default="bench/work/queries.json", help="where to write the figures")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown here (for BENCHMARKS.md)")
    args = ap.parse_args()

    work = Path(args.work)
    print(f"generating ~{args.rows:,} example rows under {work} (reused when present) ...", flush=True)
    info, runs = generate(work, args.rows, args.runs, args.probe_pairs, args.probe_every, args.batch_size,
                          args.steps_per_file)
    con = queries.connect(runs, threads=args.threads)
    n_rows = con.sql("SELECT count(*) FROM examples").fetchall()[0][0]
    n_probe = con.sql("SELECT count(*) FROM examples WHERE source = 'probe'").fetchall()[0][0]
    size = sum(f.stat().st_size for r in runs for f in (r / "examples").glob("*.parquet"))
    print(f"{n_rows:,} example rows ({n_probe:,} probe rows) in {len(runs)} runs, "
          f"{size / 2**20:.0f} MiB of Parquet; cache pairs: "
          f"{con.sql('SELECT count(*) FROM pairs').fetchall()[0][0]:,}", flush=True)

    threads = int(con.sql("SELECT current_setting('threads')").fetchall()[0][0])
    results = []
    for q in queries.list_queries():
        t0 = time.perf_counter()
        df = queries.run_query(con, q.name, PARAMS.get(q.name))
        cold = time.perf_counter() - t0
        warm, cpu = [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            queries.run_query(con, q.name, PARAMS.get(q.name))
            warm.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        med, cpu_med = statistics.median(warm), statistics.median(cpu)
        results.append({"query": q.name, "cold_s": round(cold, 3), "median_s": round(med, 3),
                        "max_s": round(max(warm), 3), "cpu_s": round(cpu_med, 3),
                        "cpu_per_thread_s": round(cpu_med / threads, 3), "result_rows": df.height})
        print(f"  {q.name:16s} median {med:6.3f} s wall, {cpu_med:6.3f} s CPU (cold {cold:.3f} s, "
              f"{df.height} rows)", flush=True)

    table = pl.DataFrame(results)
    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True):
        print(table)
    load = os.getloadavg()
    out = {
        "query_10m_max_s": max(r["median_s"] for r in results),
        # CPU seconds / DuckDB threads: what the wall time would be on idle cores (robust to other load)
        "query_10m_max_cpu_per_thread_s": max(r["cpu_per_thread_s"] for r in results),
        "example_rows": n_rows, "probe_rows": n_probe, "runs": len(runs), "parquet_mib": round(size / 2**20, 1),
        "queries": results, "repeat": args.repeat, "target_s": 1.5,
        "machine": {"cpus": os.cpu_count(), "duckdb_threads": threads,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "duckdb": duckdb.__version__, "polars": pl.__version__, "loadavg_1m_at_end": load[0]},
        "layout": info,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    if args.markdown:
        intro = (f"Named diagnostics on {n_rows:,} example rows ({n_probe:,} probe rows, {len(runs)} runs, "
                 f"{size / 2**20:.0f} MiB Parquet), DuckDB {duckdb.__version__}, {threads} threads, median of "
                 f"{args.repeat} warm runs (1-min load average {load[0]:.1f} at the end: other work shares the "
                 "CPU; CPU s / threads is the wall time idle cores would give).")
        lines = [intro, "",
                 "| diagnostic | wall s (median) | CPU s / threads | cold s | rows out |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['query']} | {r['median_s']:.3f} | {r['cpu_per_thread_s']:.3f} | {r['cold_s']:.3f} | "
                  f"{r['result_rows']} |" for r in results]
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    worst = out["query_10m_max_s"]
    print(f"slowest diagnostic: {worst:.3f} s wall, {out['query_10m_max_cpu_per_thread_s']:.3f} s CPU/thread "
          f"(target <= 1.5 s); load average {load[0]:.1f} (other work on this machine inflates wall times); "
          f"figures -> {args.json}")


if __name__ == "__main__":
    main()
