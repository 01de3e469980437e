"""GPU check of stages 1 and 2 on a CUDA device: throughput, MFU, peak memory, and ln 2 at step 0.

    bash bench/gpu_check.sh                # on a lent H200: a ~1B random-init Llama built on the device
    bash bench/gpu_check.sh --dry-run      # tiny sizes on the CPU, same code path (tests run this)

1. Builds a random-init Llama (~1B parameters: hidden 2048, 20 layers, GQA 16/8 heads, vocab 32,000) with the
   embedded model's tokenizer, and synthetic pairs (~256-token prompts, ~256-token completions).
2. Stage 1: `precompute` with the hf backend in bf16 on the device: tokens/s and MFU (2 FLOPs per parameter per
   token, attention left out) against the device's bf16 matmul peak (--peak-tflops, 790 for an H200).
3. Stage 2: the trainer's own `setup` / `train_step` from that cache: bf16 FSDP2 mixed precision on one process,
   activation checkpointing; tokens/s and MFU (6 FLOPs per parameter per token: forward and backward; the
   recomputed forward is not counted, as MFU conventions go); peak GPU memory.
4. The embedded model (data/tiny-llama): an fp32 cache scored on the device, then the step-0 loss - ln 2 of an fp32
   and a bf16 (FSDP mixed precision) policy started from it.

Prints the figures and writes them as JSON (--json). Needs torch, transformers, pyarrow; no vLLM, no network.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# model (hidden, layers, heads, kv heads, intermediate, vocab), data (pairs, prompt and completion tokens), training
SIZES = {
    "full": {"hidden": 2048, "layers": 20, "heads": 16, "kv_heads": 8, "intermediate": 5632, "vocab": 32000,
             "pairs": 256, "prompt_tokens": 256, "completion_tokens": 256,
             "steps": 6, "batch_size": 32, "max_tokens": 32768},
    "dry-run": {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 128, "vocab": 1420,
                "pairs": 16, "prompt_tokens": 24, "completion_tokens": 24,
                "steps": 2, "batch_size": 4, "max_tokens": 2048},
}


def build_model(out, z, device):
    """A random-init Llama with the embedded tokenizer, built on the device and saved in fp32."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "data", "tiny-llama"))
    cfg = LlamaConfig(vocab_size=max(z["vocab"], len(tok)), hidden_size=z["hidden"], intermediate_size=z["intermediate"],
                      num_hidden_layers=z["layers"], num_attention_heads=z["heads"], num_key_value_heads=z["kv_heads"],
                      head_dim=z["hidden"] // z["heads"], max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return params


def mfu(flops_per_token, tokens_per_s, peak_tflops):
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def stage1(model, data, cache, dtype, batch_size, limit=None):
    """Score `data` into `cache` with the hf backend; returns (tokens/s of the scoring, the precompute summary)."""
    from pipeline.precompute import precompute

    shutil.rmtree(cache, ignore_errors=True)
    s = precompute(data, model, cache, backend="hf", dtype=dtype, batch_size=batch_size, limit=limit,
                   max_length=1024, progress=False)
    return s["tokens"] / s["score_seconds"], s


def stage2(cache, out, dtype, steps, batch_size, max_tokens, grad_checkpointing, device):
    """`steps` optimizer steps through dpo.train.setup/train_step (FSDP2 on one process); returns the results."""
    from dpo.train import TrainConfig, setup, train_step

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(cache=cache, out=out, dtype=dtype, parallel="fsdp", grad_checkpointing=grad_checkpointing,
                      steps=steps, batch_size=batch_size, max_tokens=max_tokens, lr=1e-6, probe_size=0,
                      checkpoint_every=0, save_final=False, progress=False, device=device)
    with setup(cfg) as run:
        return [train_step(run, s) for s in range(steps)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, on the CPU unless a GPU is there")
    ap.add_argument("--work", default=os.path.join(ROOT, "bench", "work", "gpu_check"))
    ap.add_argument("--json", default=None, help="write the figures here (default WORK/gpu_check.json)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="the device's bf16 matmul peak (H200: ~790)")
    args = ap.parse_args()

    import torch
    from train import build_data  # bench/train.py

    z = SIZES["dry-run" if args.dry_run else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("gpu_check: no CUDA device visible; use --dry-run to check the script on a CPU")
    os.makedirs(args.work, exist_ok=True)
    w = args.work
    fig = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dry_run": args.dry_run, "peak_tflops": args.peak_tflops}

    t0 = time.perf_counter()
    model = os.path.join(w, "model")
    params = build_model(model, z, device)
    data = build_data(os.path.join(w, f"pairs-{z['pairs']}.jsonl"), z["pairs"], z["prompt_tokens"],
                      z["completion_tokens"])
    fig |= {"params": params, "build_s": time.perf_counter() - t0}
    print(f"model: {params / 1e6:,.2f}M parameters (random init, built on {device}), {z['pairs']} pairs")

    # stage 1: hf scorer, bf16
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate, s1 = stage1(model, data, os.path.join(w, "cache"), "bfloat16", batch_size=z["batch_size"])
    fig["stage1"] = {"tokens": s1["tokens"], "score_seconds": s1["score_seconds"], "tokens_per_s": rate,
                     "mfu": mfu(2 * params, rate, args.peak_tflops),
                     "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}

    # stage 2: FSDP2 on one process, bf16 mixed precision, activation checkpointing
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    results = stage2(os.path.join(w, "cache"), os.path.join(w, "run"), "bfloat16", z["steps"], z["batch_size"],
                     z["max_tokens"], True, device)
    timed = results[1:] or results  # the first step warms up kernels and allocators
    rate2 = sum(r.tokens for r in timed) / sum(r.seconds for r in timed)
    fig["stage2"] = {"steps": len(results), "batch_size": z["batch_size"], "tokens_per_s": rate2,
                     "step_s": [r.seconds for r in results], "mfu": mfu(6 * params, rate2, args.peak_tflops),
                     "losses": [float(r.scores.loss.mean()) for r in results],
                     "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}

    # the embedded model: ln 2 at step 0, fp32 and bf16 policies against an fp32 cache scored on the device
    tiny_cache = os.path.join(w, "tiny-cache")
    stage1(os.path.join(ROOT, "data", "tiny-llama"), os.path.join(ROOT, "data", "prefs", "train.jsonl"), tiny_cache,
           "float32", batch_size=16, limit=64)
    fig["step0_loss_minus_ln2"] = {}
    for dtype in ("float32", "bfloat16"):
        r = stage2(tiny_cache, os.path.join(w, f"tiny-{dtype}"), dtype, 1, 16, 4096, False, device)[0]
        fig["step0_loss_minus_ln2"][dtype] = float(r.scores.loss.mean()) - math.log(2)

    gib = 2**30
    for name in ("stage1", "stage2"):
        f = fig[name]
        mem = f"{f['peak_gpu_bytes'] / gib:.1f} GiB" if f["peak_gpu_bytes"] is not None else "n/a (cpu)"
        what = "hf scorer, bf16" if name == "stage1" else "train_step, bf16 FSDP2 (1 process), grad checkpointing"
        print(f"{name} ({what}): {f['tokens_per_s']:,.0f} tokens/s, MFU {f['mfu']:.3f} of {args.peak_tflops:g} "
              f"TFLOP/s, peak GPU memory {mem}")
    print(f"stage2 losses: {', '.join(f'{x:.4f}' for x in fig['stage2']['losses'])}")
    print("step-0 loss - ln 2 on the embedded model: " +
          ", ".join(f"{k} {v:+.2e}" for k, v in fig["step0_loss_minus_ln2"].items()))
    path = args.json or os.path.join(w, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(fig, f, indent=1)
    print(f"figures: {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
