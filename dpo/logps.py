"""Policy log-probs of completion tokens: one forward pass over chosen and rejected rows together.

The decoder runs once over the 2b padded rows (or b rows [prompt, chosen, rejected] that share the prompt,
see :func:`dpo.data.collate_shared`); the LM head is applied only at the N positions that predict a
completion token, in chunks, through :class:`TokenLogp`, which never keeps an (N, vocab) fp32 tensor alive: it
stores the logsumexp per token and recomputes each chunk's logits in the backward pass. Per-token values are
fp32; sums per row are accumulated in fp64 (the cache's sums are fp64 over fp32 per-token values, so a policy
equal to the reference reproduces them and the step-0 loss is ln 2).
"""

import torch
from torch import nn

from pipeline.packing import plain_lm_head

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (64 MiB in fp32)


class TokenLogp(torch.autograd.Function):
    """log softmax(h W^T)[target] for N rows of hidden states, chunked over rows.

    hidden (N, H), weight (V, H), targets (N,) int64 -> (N,) fp32. The matmul runs in `dtype` (the weights'
    dtype, or bfloat16 under bf16 autocast); logsumexp and the gathered logit are taken in fp32.
    Backward: d logp / d logits = onehot(target) - softmax, recomputed per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        n, v = hidden.shape[0], weight.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // v)
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                logits = (hidden[s : s + chunk].to(dtype) @ w.T).to(acc)
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                out[s : s + chunk] = (
                    logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse[s : s + chunk]
                )
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_w = (
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                g_out = grad_out[s : s + chunk].to(acc)
                probs = torch.exp((h @ w.T).to(acc) - lse[s : s + chunk, None])
                g = probs.mul_(-g_out[:, None])
                g.scatter_add_(1, targets[s : s + chunk, None], g_out[:, None])
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = (g @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += (g.T @ h).to(acc)
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


class CompletionLogps(nn.Module):
    """Wraps a causal LM; forward(...) -> (sums (2b,) fp64, per_token (N,) fp32) for a batch from
    :func:`dpo.data.collate`: sums[:b] are the chosen completions, sums[b:] the rejected ones (from 2b rows
    prompt+completion, or from b shared-prompt rows with position_ids and a 4D attention_mask).

    A module (not a function) so DistributedDataParallel can wrap the whole computation and its gradient
    hooks fire."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.fused = plain_lm_head(model)

    def forward(self, input_ids, hidden_index, targets, seq_index, n_rows, position_ids=None, attention_mask=None):
        kw = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
        if self.fused:
            hidden = self.model.get_decoder()(**kw, use_cache=False).last_hidden_state
            h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_index)
            weight = self.model.get_output_embeddings().weight
            dtype = (
                torch.get_autocast_dtype(h.device.type)
                if torch.is_autocast_enabled(h.device.type)
                else weight.dtype
            )
            tok = TokenLogp.apply(h, weight, targets, dtype)
        else:  # generic path: full logits from the model's own head
            logits = self.model(**kw, use_cache=False).logits
            sel = logits.reshape(-1, logits.shape[-1]).index_select(0, hidden_index).float()
            tok = sel.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(sel, dim=-1)
        sums = torch.zeros(n_rows, dtype=torch.float64, device=tok.device).index_add(
            0, seq_index, tok.double()
        )
        return sums, tok


def batch_logps(net, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `net` (CompletionLogps, possibly DDP-wrapped) on a collated batch.
    Returns (chosen (b,), rejected (b,), per_token (N,))."""
    def dev(key):
        return batch[key].to(device, non_blocking=True) if key in batch else None

    sums, tok = net(
        dev("input_ids"),
        dev("hidden_index"),
        dev("targets"),
        dev("seq_index"),
        2 * len(batch["chosen_len"]),
        dev("position_ids"),
        dev("attention_mask"),
    )
    b = sums.shape[0] // 2
    return sums[:b], sums[b:], tok
