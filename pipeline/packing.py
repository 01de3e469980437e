"""One row per preference pair, [prompt, chosen, rejected], so the prompt goes through the model once.

The rejected tokens take the positions right after the prompt again (len(prompt)..) and an attention mask keeps
them from seeing the chosen tokens, so every completion token is conditioned on exactly prompt + its own
completion, as in two separate rows; only the prompt's work is not done twice. Used by the hf backend of
stage 1 and by stage-2 training (`dpo.data.collate_shared`).

    row    p0 p1 p2 | c0 c1 | r0 r1 r2      positions 0 1 2 | 3 4 | 3 4 5
    c0 is predicted at p2, c1 at c0; r0 at p2 (the prompt's end), r1 at r0, r2 at r1.
"""

import numpy as np
import torch
from torch import nn


def pack_pairs(triples, pad_id: int = 0) -> dict:
    """triples: b sequences of (prompt, chosen, rejected) token ids (each non-empty). Returns
    input_ids (b, T) int64, position_ids (b, T) int64, attention_mask (b, 1, T, T) bool (True = may attend),
    hidden_index (N,) into the flattened (b*T) positions that predict the N completion tokens, targets (N,),
    seq_index (N,): chosen of pair j -> j, rejected of pair j -> b + j. N = all chosen tokens, then all rejected.
    """
    b = len(triples)
    width = max(len(p) + len(c) + len(r) for p, c, r in triples)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    seg = np.full((b, width), 3, dtype=np.int8)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    pos = np.zeros((b, width), dtype=np.int64)
    hid, tgt, seq = ([], []), ([], []), ([], [])
    for j, (p, c, r) in enumerate(triples):
        n_p, n_c, n_r = len(p), len(c), len(r)
        n = n_p + n_c + n_r
        ids[j, :n] = np.concatenate([p, c, r])
        seg[j, :n] = np.repeat(np.int8([0, 1, 2]), [n_p, n_c, n_r])
        pos[j, :n] = np.concatenate([np.arange(n_p + n_c), n_p + np.arange(n_r)])
        hid[0].append(j * width + n_p - 1 + np.arange(n_c))
        hid[1].append(j * width + np.concatenate([[n_p - 1], n_p + n_c + np.arange(n_r - 1)]))
        tgt[0].append(np.asarray(c))
        tgt[1].append(np.asarray(r))
        seq[0].append(np.full(n_c, j))
        seq[1].append(np.full(n_r, b + j))
    s = torch.from_numpy(seg)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & ~((s[:, :, None] == 2) & (s[:, None, :] == 1))
    return {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "attention_mask": mask[:, None],
        "hidden_index": torch.from_numpy(np.concatenate(hid[0] + hid[1]).astype(np.int64)),
        "targets": torch.from_numpy(np.concatenate(tgt[0] + tgt[1]).astype(np.int64)),
        "seq_index": torch.from_numpy(np.concatenate(seq[0] + seq[1]).astype(np.int64)),
    }


def takes_custom_mask(model) -> bool:
    """True when the attention implementation honours a custom 4D mask (sdpa, eager; not flash_attention_2)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


def plain_lm_head(model) -> bool:
    """True when logits are exactly hidden @ W^T (no bias, soft-capping or scaling)."""
    head = model.get_output_embeddings()
    cfg = model.config
    return (
        isinstance(head, nn.Linear)
        and head.bias is None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", 1.0) in (None, 1.0)
        and getattr(cfg, "logits_scaling", 1.0) in (None, 1.0)
    )
