"""Log-probs of completion tokens under a causal LM: the one kernel both stages run.

decoder -> hidden states at the N positions that predict a completion token -> LM head in row chunks ->
log-softmax and gather in fp32. Stage 1 (`HFScorer.score_pairs` in pipeline/backends/hf.py) runs it under no_grad
to fill the cache; stage 2 (dpo/, through dpo/logps.py) runs it with gradients for the policy and under no_grad
for a live reference. Running the same code is what makes a policy equal to the reference reproduce the cached
numbers (step-0 loss ln 2). It lives in `pipeline` because stage 1 must not depend on the training package.

Rows come either as 2b padded rows (prompt + completion each) or as b shared-prompt rows with position_ids and
a 4D mask (pipeline/packing.py); `hidden_index` points at the hidden states to score either way.
The independent oracle `HFScorer.score` (used by `refcache verify`) shares only `token_logps`.
"""

import os

import torch
from torch import nn

from pipeline.packing import plain_lm_head

CHUNK_ELEMENTS = 1 << 24  # logits per row chunk of the head (64 MiB in fp32; 341 rows at vocab 49,152)

# oneDNN levels below AVX512_CORE_BF16: ONEDNN_MAX_CPU_ISA at one of these keeps oneDNN off the bf16 instructions
_ONEDNN_BELOW_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def bf16_matmul_native(device) -> bool:
    """False on a CPU where torch's bf16 matmul has no bf16 instructions (neither AVX512-BF16 nor AMX-BF16),
    where it is 2-4.5x SLOWER than fp32: oneDNN then converts each tile to fp32 in software, and without AVX-512
    torch skips oneDNN for a generic loop (figures: BENCHMARKS.md, "SmolLM2: the bf16 cliff"). ONEDNN_MAX_CPU_ISA
    capped below AVX512_CORE_BF16 counts as no bf16 instructions. Non-CPU devices and non-x86 CPUs: True (run
    bf16 as asked)."""
    if torch.device(device).type != "cpu":
        return True
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture") not in ("x86_64", "x86"):
        return True
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and (caps.get("avx512_bf16") or caps.get("amx_bf16")) and isa not in _ONEDNN_BELOW_BF16)


def token_logps(logits, targets):
    """log_softmax(logits)[targets] in fp32. logits [..., V] (any float dtype), targets [...] int64 -> [...].

    torch's fused log_softmax keeps each row in cache, unlike logsumexp's composite max / subtract / exp / sum
    (timing: BENCHMARKS.md)."""
    lf = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(lf, dim=-1).gather(-1, targets[..., None])[..., 0]


class TokenLogp(torch.autograd.Function):
    """log softmax(h W^T)[target] for N rows of hidden states, chunked over rows.

    hidden (N, H), weight (V, H), targets (N,) int64 -> (N,) fp32 (fp64 for fp64 inputs). The matmul runs in
    `dtype` (the weights' dtype, or bfloat16 under bf16 autocast); the log-softmax is taken in fp32. No
    (N, V) tensor is kept: the backward recomputes each chunk's logits, d logp / d logits = onehot - softmax.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        n, v = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // v)
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)
        out = torch.empty(n, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                logits = hidden[s : s + chunk].to(dtype) @ w.T
                out[s : s + chunk] = token_logps(logits.to(acc), targets[s : s + chunk])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.dtype, ctx.chunk, ctx.acc = dtype, chunk, acc
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        dtype, chunk, acc = ctx.dtype, ctx.chunk, ctx.acc
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                g_out = grad_out[s : s + chunk].to(acc)
                g = torch.softmax((h @ w.T).to(acc), dim=-1).mul_(-g_out[:, None])
                g.scatter_add_(1, targets[s : s + chunk, None], g_out[:, None])
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.addmm_(g.T, h) if acc == dtype else grad_w.add_((g.T @ h).to(acc))
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


class CompletionLogps(nn.Module):
    """Wraps a causal LM; forward(...) -> (sums (n_rows,) fp64, per_token (N,) fp32): sums[:b] are the chosen
    completions, sums[b:] the rejected ones; per_token lists all chosen tokens, then all rejected ones.

    `decode` (optional) replaces the model's decoder call: f(input_ids=, position_ids=, attention_mask=) ->
    hidden states (rows, T, H); stage 1 passes its torch.compile'd decoder this way. Per-token values are fp32,
    sums fp64 (the cache's sums are fp64 over fp32 per-token values). A module, not a function, so
    DistributedDataParallel can wrap the whole computation and its gradient hooks fire."""

    def __init__(self, model, decode=None):
        super().__init__()
        self.model = model
        self.fused = plain_lm_head(model)
        self.decode = decode

    def forward(self, input_ids, hidden_index, targets, seq_index, n_rows, position_ids=None, attention_mask=None):
        kw = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
        if self.fused:
            tok = self.head_logps(self.completion_hidden(hidden_index, **kw), targets)
        else:  # generic path: full logits from the model's own head
            logits = self.model(**kw, use_cache=False).logits
            tok = token_logps(logits.reshape(-1, logits.shape[-1]).index_select(0, hidden_index), targets)
        sums = torch.zeros(n_rows, dtype=torch.float64, device=tok.device).index_add(0, seq_index, tok.double())
        return sums, tok

    def completion_hidden(self, hidden_index, **kw):
        """Last-layer hidden states (N, H) at the N positions that predict a completion token (fused path)."""
        hidden = (self.decode(**kw) if self.decode is not None
                  else self.model.get_decoder()(**kw, use_cache=False).last_hidden_state)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_index)

    def head_logps(self, h, targets):
        """(N,) fp32 log p of `targets` from those hidden states through the LM head (TokenLogp)."""
        weight = self.model.get_output_embeddings().weight
        auto = torch.is_autocast_enabled(h.device.type)
        dtype = torch.get_autocast_dtype(h.device.type) if auto else weight.dtype
        return TokenLogp.apply(h, weight, targets, dtype)
