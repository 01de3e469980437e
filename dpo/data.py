"""Cache reader and batching: stage-1 Parquet rows -> padded token tensors, in length-grouped batches.

Stage 2 never re-tokenizes: the token ids scored in stage 1 are the ones trained on. Batches are a pure
function of (seed, epoch, batch index), so the data position is just the step number and resume is exact.
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from refcache_base import UserError

COLUMNS = [
    "pair_id",
    "source_index",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "ref_chosen_logp",
    "ref_rejected_logp",
    "prompt_len",
    "chosen_len",
    "rejected_len",
]


@dataclass
class Pairs:
    """All pairs of one cache, flattened: token lists as (values, offsets) numpy arrays, one entry per pair."""

    path: str
    manifest: dict
    pair_id: np.ndarray  # (n,) object (str)
    source_index: np.ndarray  # (n,) int64
    prompt: tuple[np.ndarray, np.ndarray]  # (values int32, offsets int64 (n+1,))
    chosen: tuple[np.ndarray, np.ndarray]
    rejected: tuple[np.ndarray, np.ndarray]
    ref_chosen_logp: np.ndarray  # (n,) float64
    ref_rejected_logp: np.ndarray
    prompt_len: np.ndarray  # (n,) int64
    chosen_len: np.ndarray
    rejected_len: np.ndarray

    def __len__(self):
        return len(self.pair_id)

    @property
    def seq_len(self) -> np.ndarray:
        """Longest of the two rows (prompt + completion) each pair contributes to a forward pass."""
        return self.prompt_len + np.maximum(self.chosen_len, self.rejected_len)

    @property
    def packed_len(self) -> np.ndarray:
        """Length of the one row prompt + chosen + rejected that a pair takes with a shared prompt."""
        return self.prompt_len + self.chosen_len + self.rejected_len


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    if arr.offset:  # a sliced array: rebase so offsets index into values
        arr = pa.concat_arrays([arr])
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return values[offsets[0] :], offsets - offsets[0]


def load_pairs(cache_dir: str) -> Pairs:
    """Read a stage-1 cache (manifest + Parquet parts) into :class:`Pairs`; one-line UserError if it is not a
    usable cache. Reads through pipeline.cache.load_table, the one cache reader (as verify and the DuckDB views
    do): only the parts the manifest lists, each checked for size and sha256 first."""
    from pipeline import cache as pcache

    manifest = pcache.read_manifest(cache_dir)
    table = pcache.load_table(cache_dir, columns=COLUMNS)
    if table.num_rows == 0:
        raise UserError(
            f"{cache_dir}: the cache has no pairs; re-run `refcache precompute` on non-empty data"
        )
    p = Pairs(
        path=cache_dir,
        manifest=manifest,
        pair_id=np.asarray(table.column("pair_id").to_pylist(), dtype=object),
        source_index=table.column("source_index").to_numpy(),
        prompt=_flat(table.column("prompt_ids")),
        chosen=_flat(table.column("chosen_ids")),
        rejected=_flat(table.column("rejected_ids")),
        ref_chosen_logp=table.column("ref_chosen_logp").to_numpy().astype(np.float64),
        ref_rejected_logp=table.column("ref_rejected_logp").to_numpy().astype(np.float64),
        prompt_len=table.column("prompt_len").to_numpy().astype(np.int64),
        chosen_len=table.column("chosen_len").to_numpy().astype(np.int64),
        rejected_len=table.column("rejected_len").to_numpy().astype(np.int64),
    )
    _validate(p)
    return p


def take(p: Pairs, rows: np.ndarray) -> Pairs:
    """The pairs at `rows` (in that order), as a Pairs of their own (same path and manifest)."""
    rows = np.asarray(rows, dtype=np.int64)

    def lists(flat):
        values, offsets = flat
        lens = np.diff(offsets)[rows]
        new = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return values[np.repeat(offsets[rows] - new[:-1], lens) + np.arange(new[-1])], new

    return Pairs(path=p.path, manifest=p.manifest, pair_id=p.pair_id[rows], source_index=p.source_index[rows],
                 prompt=lists(p.prompt), chosen=lists(p.chosen), rejected=lists(p.rejected),
                 ref_chosen_logp=p.ref_chosen_logp[rows], ref_rejected_logp=p.ref_rejected_logp[rows],
                 prompt_len=p.prompt_len[rows], chosen_len=p.chosen_len[rows], rejected_len=p.rejected_len[rows])


def _validate(p: Pairs):
    def bad(mask, what):
        i = int(np.flatnonzero(mask)[0])
        raise UserError(
            f"{p.path}: pair source_index={p.source_index[i]} ({p.pair_id[i]}): {what}; "
            "rebuild the cache with `refcache precompute`"
        )

    for name, (vals, offs), lens in (
        ("prompt", p.prompt, p.prompt_len),
        ("chosen", p.chosen, p.chosen_len),
        ("rejected", p.rejected, p.rejected_len),
    ):
        counts = np.diff(offs)
        if (counts != lens).any():
            bad(counts != lens, f"{name}_len does not match the number of {name}_ids")
    if (p.prompt_len < 1).any():
        bad(p.prompt_len < 1, "empty prompt (the first completion token needs a prompt token before it)")
    for name, lens in (("chosen", p.chosen_len), ("rejected", p.rejected_len)):
        if (lens < 1).any():
            bad(lens < 1, f"empty {name} completion")
    for name, v in (("ref_chosen_logp", p.ref_chosen_logp), ("ref_rejected_logp", p.ref_rejected_logp)):
        if not np.isfinite(v).all():
            bad(~np.isfinite(v), f"{name} is not finite")
    if (p.prompt[0] < 0).any() or (p.chosen[0] < 0).any() or (p.rejected[0] < 0).any():
        raise UserError(f"{p.path}: negative token ids in the cache; rebuild it with `refcache precompute`")


# ---- batching -----------------------------------------------------------------------------------------------


def epoch_batches(
    lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 32
) -> list[np.ndarray]:
    """The batches (arrays of row indices) of one epoch: shuffle with (seed, epoch), cut into mega-batches of
    `group` batches, sort each by length (longest first) and cut it into batches, then shuffle the batch
    order. Pairs of similar length share a batch, so padding is small, while every epoch sees a new order.
    The last n % batch_size pairs (a different set each epoch) are left out."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    n_batches = n // batch_size
    perm = rng.permutation(n)[: n_batches * batch_size]
    batches = []
    mega = group * batch_size
    for s in range(0, len(perm), mega):
        chunk = perm[s : s + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def split_batch(idx: np.ndarray, lengths: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split a batch into `parts` equal micro-batches of similar length (sorted, contiguous)."""
    idx = idx[np.argsort(-lengths[idx], kind="stable")]
    return list(idx.reshape(parts, -1))


def split_tokens(idx: np.ndarray, cost: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut a micro-batch into consecutive pieces whose forward pass holds at most `max_tokens` padded tokens:
    len(piece) x the largest `cost` in it, where cost[i] is what pair i adds to a row-padded batch (2 rows of
    prompt+completion, or one shared-prompt row). At least one pair per piece; 0 = no limit. The loss is a
    sum over pairs, so the pieces add up to the same gradient."""
    if max_tokens <= 0 or len(idx) == 0:
        return [idx]
    pieces, start, widest = [], 0, 0
    for i, j in enumerate(idx):
        widest = max(widest, int(cost[j]))
        if i > start and (i + 1 - start) * widest > max_tokens:
            pieces.append(idx[start:i])
            start, widest = i, int(cost[j])
    pieces.append(idx[start:])
    return pieces


def probe_subset(n: int, size: int, seed: int) -> np.ndarray:
    """A fixed, seeded subset of `size` row indices (all rows if size >= n), in row order."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7919]).choice(n, size=size, replace=False))


def collate(p: Pairs, idx: np.ndarray, pad_id: int = 0, share_prompt: bool = False) -> dict:
    """Tensors for one forward pass over b pairs: 2b rows [prompt+chosen for each pair, then prompt+rejected],
    right-padded (no attention mask needed: real tokens never attend to the padding after them).

    input_ids (2b, T) int64; hidden_index (N,) flat index into the (2b*T) hidden states that predict the N
    completion tokens; targets (N,) those tokens; seq_index (N,) their row; chosen_len/rejected_len (b,);
    ref_chosen_logp/ref_rejected_logp (b,) float64; tokens (int) non-pad tokens.
    """
    if share_prompt:
        return collate_shared(p, idx, pad_id)
    b = len(idx)
    rows, comp_starts, comp_lens = [], [], []
    for side in (p.chosen, p.rejected):
        for i in idx:
            pr = p.prompt[0][p.prompt[1][i] : p.prompt[1][i + 1]]
            co = side[0][side[1][i] : side[1][i + 1]]
            rows.append(np.concatenate([pr, co]))
            comp_starts.append(len(pr))
            comp_lens.append(len(co))
    width = max(len(r) for r in rows)
    ids = np.full((2 * b, width), pad_id, dtype=np.int64)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = r
    comp_lens = np.asarray(comp_lens)
    seq_index = np.repeat(np.arange(2 * b), comp_lens)
    # position of each completion token within its row: start + 0..len-1; predicted by the hidden state before
    pos = np.concatenate([s + np.arange(n) for s, n in zip(comp_starts, comp_lens)])
    flat = seq_index * width + pos
    return {
        "input_ids": torch.from_numpy(ids),
        "hidden_index": torch.from_numpy(flat - 1),
        "targets": torch.from_numpy(ids.reshape(-1)[flat]),
        "seq_index": torch.from_numpy(seq_index),
        "chosen_len": torch.from_numpy(p.chosen_len[idx].astype(np.float64)),
        "rejected_len": torch.from_numpy(p.rejected_len[idx].astype(np.float64)),
        "ref_chosen_logp": torch.from_numpy(p.ref_chosen_logp[idx]),
        "ref_rejected_logp": torch.from_numpy(p.ref_rejected_logp[idx]),
        "tokens": int(sum(len(r) for r in rows)),
        "padded": int(ids.size),
    }


def collate_shared(p: Pairs, idx: np.ndarray, pad_id: int = 0) -> dict:
    """Like :func:`collate`, but each pair is ONE row [prompt, chosen, rejected] (the prompt runs once; layout in
    :mod:`pipeline.packing`). Adds position_ids (b, T) and attention_mask (b, 1, T, T) bool; hidden_index points
    into the (b*T) hidden states; seq_index still numbers chosen 0..b-1 and rejected b..2b-1."""
    from pipeline.packing import pack_pairs

    def ids(side, i):
        return side[0][side[1][i] : side[1][i + 1]]

    batch = pack_pairs([(ids(p.prompt, i), ids(p.chosen, i), ids(p.rejected, i)) for i in idx], pad_id)
    return {
        **batch,
        "chosen_len": torch.from_numpy(p.chosen_len[idx].astype(np.float64)),
        "rejected_len": torch.from_numpy(p.rejected_len[idx].astype(np.float64)),
        "ref_chosen_logp": torch.from_numpy(p.ref_chosen_logp[idx]),
        "ref_rejected_logp": torch.from_numpy(p.ref_rejected_logp[idx]),
        "tokens": int(p.packed_len[idx].sum()),
        "padded": int(batch["input_ids"].numel()),
    }
