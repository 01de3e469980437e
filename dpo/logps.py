"""Policy log-probs of completion tokens for a collated stage-2 batch.

The kernel (decoder -> hidden states at completion positions -> chunked LM head -> fp32 log-softmax/gather)
is :mod:`pipeline.logps`, the same code stage 1 fills the cache with; this module feeds it `dpo.data` batches.
"""

import torch

from pipeline.logps import CompletionLogps

__all__ = ["CompletionLogps", "batch_logps"]


def batch_logps(net, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `net` (CompletionLogps, possibly DDP-wrapped) on a batch from :func:`dpo.data.collate`.
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
