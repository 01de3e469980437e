"""CHES: how likely a preference pair is to displace its chosen response, from the reference model alone.

Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"
(https://arxiv.org/abs/2410.08847), section 5. With h the reference model's last-layer hidden state (decoder
output after the final norm: the input of the LM head) at each position that predicts a completion token:

    ches    = <sum h+, sum h->  - ||sum h+||^2        (sums over the chosen (+) and rejected (-) tokens)
    ln_ches = <mean h+, mean h-> - ||mean h+||^2      (means over each completion's own tokens)

The higher, the more similar the two completions look to the model, and the more a DPO step that pushes the
rejected one down drags the chosen one with it. The paper drops the top-scoring pairs (by ln-CHES) to avoid
displacement. Computed in fp32 whatever the model's dtype (bf16 hidden states are upcast first).

Whether a cache has CHES (the manifest's `backend.settings.ches`) and the line saying why not are part of the cache
contract: refcache_base.cache_schema (CHES_COMPUTED, ches_missing_reason), readable without torch.

Both backends feed `ches_scores`: hf from its scoring forward's hidden states (a pair packed into one row),
vllm from a second engine's per-token hidden states of each pair's two sequences (`sequence_ches`).
"""

import torch


def ches_scores(hidden, seq_index, n_pairs: int):
    """hidden (N, H): hidden states at the N completion-predicting positions of `n_pairs` pairs, any float
    dtype; seq_index (N,) int64: row j < n_pairs = chosen of pair j, n_pairs + j = rejected of pair j (the
    order pipeline/packing.py's pack_pairs gives). Every completion has at least one token.
    Returns (ches, ln_ches), each (n_pairs,) float32."""
    h = hidden.float()
    sums = torch.zeros(2 * n_pairs, h.shape[1], dtype=torch.float32, device=h.device).index_add_(0, seq_index, h)
    counts = torch.bincount(seq_index, minlength=2 * n_pairs).to(torch.float32)
    means = sums / counts[:, None]
    return _score(sums[:n_pairs], sums[n_pairs:]), _score(means[:n_pairs], means[n_pairs:])


def sequence_ches(hidden: list, starts) -> list:
    """CHES of pairs given as two full sequences each: hidden[2j] (len, H) the hidden states of every position of
    prompt + chosen of pair j, hidden[2j + 1] those of prompt + rejected; starts[i] where sequence i's completion
    begins. The states at positions starts[i] - 1 .. len - 2 (each predicts the next token, a completion token)
    go to `ches_scores`. Returns [(ches, ln_ches)] per pair, floats."""
    n = len(hidden) // 2
    rows = [h[st - 1 : h.shape[0] - 1] for h, st in zip(hidden, starts)]
    seq = [j // 2 + (j % 2) * n for j in range(2 * n)]  # chosen of pair j -> row j, rejected -> n + j
    seq_index = torch.repeat_interleave(torch.tensor(seq), torch.tensor([r.shape[0] for r in rows]))
    ches, ln_ches = ches_scores(torch.cat(rows), seq_index, n)
    return list(zip(ches.tolist(), ln_ches.tolist()))


def _score(pos, neg):
    """<pos, neg> - ||pos||^2 row by row: pos, neg (b, H) -> (b,)."""
    return (pos * neg).sum(-1) - (pos * pos).sum(-1)
