"""Stage-2 benchmark: seconds/step and peak memory of training from the cache vs `--live-ref`.

  .venv/bin/python bench/train.py                       # ~30M-param Llama, batch 8, ~256-token pairs
  .venv/bin/python bench/train.py --json bench/work/train.json --steps 8 --batch-size 8

Same model, batch, lengths, dtype and optimizer in both modes; each mode runs in its own process so peak RSS
(ru_maxrss over the training loop) is its own. The model is a random-init Llama (random weights are fine for
timing) saved under --work together with a cache of synthetic pairs scored by the hf backend; both are reused
on later runs. Prints a table and writes the figures as JSON.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_model(out, hidden, layers, intermediate, tokenizer_from):
    """A random-init Llama with the embedded model's tokenizer (so the stage-1 tokenization is real)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def build_data(path, n, prompt_tokens, completion_tokens, seed=0):
    """Synthetic pairs of roughly the asked lengths, from the embedded preference texts glued together."""
    if os.path.isfile(path):
        return path
    with open(os.path.join(ROOT, "data", "prefs", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    words = " ".join(
        r["prompt"] + r["chosen"]
        for r in rows
        if isinstance(r["prompt"], str) and isinstance(r["chosen"], str)
    ).split()
    rng = random.Random(seed)

    def text(n_tok):  # ~1.5 tokens per word for this tokenizer; lengths spread +-50%
        k = max(3, int(n_tok / 1.5 * rng.uniform(0.5, 1.5)))
        s = rng.randrange(len(words) - k)
        return " ".join(words[s : s + k])

    with open(path + ".tmp", "w") as f:
        f.writelines(
            json.dumps(
                {
                    "prompt": text(prompt_tokens),
                    "chosen": " " + text(completion_tokens),
                    "rejected": " " + text(completion_tokens),
                }
            )
            + "\n"
            for _ in range(n)
        )
    os.replace(path + ".tmp", path)
    return path


def child(args):
    """One training run in this process; prints its summary as JSON on the last line."""
    import torch

    from dpo.train import TrainConfig, train

    s = train(
        TrainConfig(
            cache=args.cache,
            out=args.run,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            beta=args.beta,
            warmup=args.warmup,
            live_ref=args.child == "live",
            probe_every=0,
            probe_size=0,
            checkpoint_every=0,
            save_final=False,
            threads=args.threads,
            progress=False,
            dtype=args.dtype,
            max_tokens=args.max_tokens,
        )
    )
    import pyarrow.parquet as pq

    secs = pq.read_table(os.path.join(args.run, "steps.parquet")).column("seconds").to_pylist()
    s["step_seconds"] = secs
    s["torch_threads"] = torch.get_num_threads()
    print(json.dumps(s, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "work"), help="model/cache/runs (reused)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--completion-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=2048, help="refcache's padded-token budget per forward")
    ap.add_argument("--max-length", type=int, default=1024, help="stage-1 max prompt+completion tokens")
    ap.add_argument("--model", help="use this HF model dir instead of building a random-init Llama")
    ap.add_argument("--data", help="use this preference file (JSONL) instead of synthetic pairs")
    ap.add_argument("--quick", action="store_true", help="toy sizes, to check the script runs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the figures here (default WORK/train_bench.json)")
    ap.add_argument("--child", choices=["cached", "live"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import shutil

    os.makedirs(args.work, exist_ok=True)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.pairs = 128, 2, 352, 16
        args.prompt_tokens = args.completion_tokens = 32
        args.steps = min(args.steps, 3)
    if args.model:
        model = os.path.abspath(args.model)
        tag = os.path.basename(os.path.normpath(model))
    else:
        tag = f"llama-h{args.hidden}-l{args.layers}-i{args.intermediate}"
        model = build_model(
            os.path.join(args.work, tag),
            args.hidden,
            args.layers,
            args.intermediate,
            os.path.join(ROOT, "data", "tiny-llama"),
        )
    if args.data:
        data = os.path.abspath(args.data)
    else:
        name = f"pairs-{args.pairs}-{args.prompt_tokens}-{args.completion_tokens}.jsonl"
        data = build_data(
            os.path.join(args.work, name), args.pairs, args.prompt_tokens, args.completion_tokens
        )
    key = hashlib.sha256(f"{model}|{data}|{args.max_length}".encode()).hexdigest()[:10]
    cache = os.path.join(args.work, f"cache-{tag}-{key}")
    from pipeline.cache import is_cache

    if not is_cache(cache):
        # In a child process: a child starts with its parent's RSS as its own peak (Linux carries ru_maxrss over
        # fork and exec), so this process must stay small for the measured runs below.
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "refcache.cli", "precompute", data, "--model", model, "--out", cache,
             "--backend", "hf", "--dtype", "float32", "--max-length", str(args.max_length),
             "--max-prompt-length", str(min(512, args.max_length // 2))],
            check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
        )
        print(f"precompute: {time.perf_counter() - t0:.1f} s")

    from safetensors import safe_open

    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
        ref_bytes = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 4  # noqa: SIM118 (fp32)
    results = {}
    for mode in ("cached", "live"):
        run = os.path.join(args.work, "runs", f"{tag}-{mode}")
        shutil.rmtree(run, ignore_errors=True)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--cache",
            cache,
            "--run",
            run,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--dtype",
            args.dtype,
            "--lr",
            str(args.lr),
            "--beta",
            str(args.beta),
            "--warmup",
            str(args.warmup),
            "--max-tokens",
            str(args.max_tokens),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    fig = {}
    for mode, s in results.items():
        secs = s["step_seconds"][1:] or s["step_seconds"]  # the first step warms up allocators
        fig[mode] = {
            "step_s_mean": sum(secs) / len(secs),  # = time of these steps / steps: what an epoch costs
            "step_s_median": med(secs),
            "step_s": s["step_seconds"],
            "peak_rss_bytes": s["peak_rss_bytes"],
            "samples_per_s": args.batch_size * len(secs) / sum(secs),
            "logging_share_of_step_time": s["logging_share_of_step_time"],
        }
    out = {
        "model": model,
        "params": ref_bytes // 4,
        "ref_weight_bytes": ref_bytes,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "dtype": args.dtype,
        "pairs": args.pairs,
        "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens,
        "threads": results["cached"]["torch_threads"],
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cached": fig["cached"],
        "live": fig["live"],
        "train_cached_over_live_step_s": fig["cached"]["step_s_mean"] / fig["live"]["step_s_mean"],
        "train_mem_saved_bytes": fig["live"]["peak_rss_bytes"] - fig["cached"]["peak_rss_bytes"],
        "train_mem_saved_over_ref_weight_bytes": (
            fig["live"]["peak_rss_bytes"] - fig["cached"]["peak_rss_bytes"]
        )
        / ref_bytes,
    }
    path = args.json or os.path.join(args.work, "train_bench.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(
        f"model {out['params'] / 1e6:.1f}M params ({ref_bytes / 2**20:.0f} MiB fp32), batch {args.batch_size}, "
        f"{args.dtype}, {out['threads']} threads, {args.steps} steps"
    )
    print(f"{'mode':<8} {'s/step':>8} {'samples/s':>10} {'peak RSS MiB':>13} {'log share':>10}")
    for mode in ("cached", "live"):
        f_ = fig[mode]
        print(
            f"{mode:<8} {f_['step_s_mean']:>8.3f} {f_['samples_per_s']:>10.2f} {f_['peak_rss_bytes'] / 2**20:>13.0f} "
            f"{f_['logging_share_of_step_time']:>10.4f}"
        )
    print(
        f"cached/live step time {out['train_cached_over_live_step_s']:.3f}; memory saved "
        f"{out['train_mem_saved_bytes'] / 2**20:.0f} MiB = {out['train_mem_saved_over_ref_weight_bytes']:.2f} x ref weights"
    )
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
