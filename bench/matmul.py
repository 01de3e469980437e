"""The hardware bound: the FLOP rate a plain square matmul reaches here, and model FLOPs of the workload.

    .venv/bin/python bench/matmul.py [--n 2048] [--reps 7] [--config MODEL/config.json] [--json OUT]

Rate = 2 n^3 / seconds of `a @ b` (torch, all cores, median of --reps after one warm-up), in float32 and
bfloat16. With --config, also the rate of the model's own matmuls: one decoder layer's projections and MLP plus
the LM head as `F.linear` on --rows tokens (the size of one scoring batch), random weights of the model's shapes.
Where the hardware favours large tiles (AMX), narrow models cannot reach the square rate even with nothing but
matmuls; this second rate says how far the shapes alone fall short.

A stage's model-FLOP utilisation (MFU) is the model FLOPs it must do per second divided by the rate in its
dtype: `forward_flops` counts the matmuls of a decoder forward (attention projections, MLP, LM head: 2
multiply-adds per weight per token) plus causal attention (QK^T and AV: 4 * d_attn per attended position), and
leaves out norms, softmax and RoPE (small). Scoring one pair costs its prompt once plus both completions
attending to it, the LM head only where it predicts a completion token (`pair_flops`): the least any backend
has to compute, so sharing the prompt and skipping the head on prompt positions earn no credit.
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def matmul_rate(n, dtype, reps=7):
    """FLOP/s of an n x n @ n x n matmul: median over reps, after one warm-up."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=c)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "median_s": med,
            "flops_per_s": 2 * n**3 / med, "best_flops_per_s": 2 * n**3 / min(times)}


def model_shapes_rate(cfg, dtype, rows=2048, reps=7):
    """FLOP/s of the model's matmuls (q, k, v, o, gate, up, down, LM head) as F.linear on `rows` tokens."""
    import torch
    import torch.nn.functional as F

    d, V = _get(cfg, "hidden_size"), _get(cfg, "vocab_size")
    H = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads") or H
    hd = _get(cfg, "head_dim") or d // H
    inter = _get(cfg, "intermediate_size")
    shapes = [(d, H * hd), (d, kv * hd), (d, kv * hd), (H * hd, d), (d, inter), (d, inter), (inter, d), (d, V)]
    xs = {k: torch.randn(rows, k).to(dtype) for k in {k for k, _ in shapes}}
    ws = [torch.randn(n, k).to(dtype) / k**0.5 for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)

    def run():
        for (k, _), w in zip(shapes, ws):
            F.linear(xs[k], w)

    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"rows": rows, "shapes": shapes, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
            "median_s": statistics.median(times), "flops_per_s": flops / statistics.median(times)}


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def matmul_params(cfg):
    """Weights that take part in a matmul per token: attention projections, MLP and the LM head."""
    d, L, V = _get(cfg, "hidden_size"), _get(cfg, "num_hidden_layers"), _get(cfg, "vocab_size")
    H = _get(cfg, "num_attention_heads")
    kv = _get(cfg, "num_key_value_heads") or H
    hd = _get(cfg, "head_dim") or d // H
    inter = _get(cfg, "intermediate_size")
    per_layer = d * H * hd + 2 * d * kv * hd + H * hd * d + 3 * d * inter
    return L * per_layer + d * V


def flops_per_token(cfg, ctx):
    """Forward FLOPs of one token that attends to `ctx` positions (itself included)."""
    H = _get(cfg, "num_attention_heads")
    hd = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // H
    return 2 * matmul_params(cfg) + 4 * _get(cfg, "num_hidden_layers") * H * hd * ctx


def forward_flops(cfg, seq_len, start=0):
    """Forward FLOPs of positions start..seq_len-1 of a causal sequence (position t attends to t+1 tokens)."""
    n = seq_len - start
    H = _get(cfg, "num_attention_heads")
    hd = _get(cfg, "head_dim") or _get(cfg, "hidden_size") // H
    attended = (seq_len * (seq_len + 1) - start * (start + 1)) // 2
    return 2 * matmul_params(cfg) * n + 4 * _get(cfg, "num_hidden_layers") * H * hd * attended


def pair_flops(cfg, prompt_len, chosen_len, rejected_len):
    """Least forward FLOPs to score a pair: the prompt once, each completion attending to the prompt, and the LM
    head only at the chosen_len + rejected_len positions that predict a completion token."""
    head = 2 * _get(cfg, "hidden_size") * _get(cfg, "vocab_size") * prompt_len  # forward_flops counts it everywhere
    return (forward_flops(cfg, prompt_len) + forward_flops(cfg, prompt_len + chosen_len, prompt_len)
            + forward_flops(cfg, prompt_len + rejected_len, prompt_len) - head)


def workload_flops(cfg, lengths):
    """Forward FLOPs of scoring every (prompt, chosen, rejected) length triple once."""
    return sum(pair_flops(cfg, p, c, r) for p, c, r in lengths)


def mfu(flops, seconds, rate):
    return flops / seconds / rate if seconds and rate else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="n=256, 3 reps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--config", default=None, help="a model's config.json: also time its own matmul shapes")
    ap.add_argument("--rows", type=int, default=2048, help="tokens per matmul for --config (default 2048)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    n, reps = (256, 3) if args.quick else (args.n, args.reps)
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        r = matmul_rate(n, dtype, reps)
        out[name] = r
        print(f"matmul {n}x{n} {name:8s}: {r['flops_per_s'] / 1e9:8.1f} GFLOP/s (median of {reps}, "
              f"best {r['best_flops_per_s'] / 1e9:.1f}) on {out['threads']} threads", flush=True)
    out["matmul_fp32_gflops"] = out["float32"]["flops_per_s"] / 1e9
    out["matmul_bf16_gflops"] = out["bfloat16"]["flops_per_s"] / 1e9
    if args.config:
        cfg = json.loads(Path(args.config).read_text())
        out["model_shapes"] = {}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            r = model_shapes_rate(cfg, dtype, args.rows, reps)
            out["model_shapes"][name] = r
            print(f"model's matmul shapes on {args.rows} rows, {name:8s}: {r['flops_per_s'] / 1e9:8.1f} GFLOP/s",
                  flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
