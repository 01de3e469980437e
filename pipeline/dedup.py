"""Duplicate pairs: the first copy is kept, every later copy goes to rejected_rows as "duplicate of row N".

A pair's identity is its pair_id (a hash of prompt, chosen, rejected as given), so keeping only the first row
of each pair_id keeps pair_id unique in a cache (joins on it never multiply rows) and loses nothing: the later
copies are listed with the row they repeat, and rows read = kept + rejected still holds. The rule depends only
on row order, and every shard streams through all input rows, so each shard makes the same decisions and a
sharded cache equals a single-process one.

--keep-duplicates (TRL's row counts: TRL trains on every copy) keeps the later copies too, each under the
pair_id of its occurrence, `copy_id`: the n-th copy (in row order) of pair ID is "ID#n" (the first stays "ID"),
so pair_id is still unique in the cache and the same on every run and shard.

Memory: 16 bytes per distinct pair (12 bytes of the 128-bit pair_id and a uint32 row number), 20 when counting
copies (a uint32 count), in sorted runs whose sizes at least double; merging two runs briefly holds both and
the result (measured: BENCHMARKS.md).
Two different pairs that share the first 96 bits of their pair_id would be taken for copies: at 100 million
pairs the chance is about 6e-14. (A copy's pair_id, "ID#n", is keyed by 96 bits of its sha256 instead, for
`refcache verify`'s uniqueness check.)
"""

import hashlib

import numpy as np

from refcache_base import UserError

KEY = "S12"  # the first 12 bytes of the pair_id


def _key(pair_id: str) -> bytes:
    """96 bits of a pair_id: its first 24 hex digits, or for a copy's id (ID#n) the first 12 bytes of its sha256."""
    return bytes.fromhex(pair_id[:24]) if "#" not in pair_id else hashlib.sha256(pair_id.encode()).digest()[:12]


def copy_id(pair_id: str, n: int) -> str:
    """The pair_id of the n-th copy of a pair (n = 1, 2, ... in row order) under --keep-duplicates."""
    return pair_id if n == 1 else f"{pair_id}#{n}"


class SeenPairs:
    """pair_id -> the first row that had it (and with `count`, how many rows had it), for every row seen so far."""

    def __init__(self, count=False):
        self.count = count
        self.runs = []  # [(sorted keys, their first rows, their counts or None)], sizes decreasing

    def __len__(self):
        return sum(len(r[0]) for r in self.runs)

    def first_rows(self, pair_ids, rows) -> tuple[np.ndarray, np.ndarray | None]:
        """For each (pair_id, row), in row order: the first row with that pair_id (the row itself when it is the
        first) and, with `count`, which copy the row is (1 for the first; else None). Remembers them."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64) if self.count else None
        if rows[-1] >= 2**32:
            raise UserError("more than 4,294,967,295 input rows: split the input and build one cache per part")
        keys = np.array([_key(p) for p in pair_ids], dtype=KEY)
        rows = np.asarray(rows, dtype=np.uint32)
        uniq, first_pos, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        first = rows[first_pos]
        before = np.zeros(len(uniq), dtype=np.uint32)  # copies in earlier batches
        new = np.ones(len(uniq), dtype=bool)
        for run_keys, run_rows, run_counts in self.runs:  # earlier rows: a key is in at most one run
            pos = np.minimum(np.searchsorted(run_keys, uniq), len(run_keys) - 1)
            hit = run_keys[pos] == uniq
            first = np.where(hit, run_rows[pos], first)
            new &= ~hit
            if self.count:
                before[hit] = run_counts[pos[hit]]
                run_counts[pos[hit]] += counts[hit].astype(np.uint32)  # keys are unique: no repeated index
        self._add(uniq[new], first[new], counts[new].astype(np.uint32) if self.count else None)
        if not self.count:
            return first[inverse].astype(np.int64), None
        order = np.argsort(inverse, kind="stable")  # rows grouped by pair, in row order within a pair
        rank = np.empty(len(rows), dtype=np.int64)
        rank[order] = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        return first[inverse].astype(np.int64), before[inverse].astype(np.int64) + rank + 1

    def _add(self, keys, rows, counts):
        if not len(keys):
            return
        self.runs.append((keys, rows, counts))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            small, big = self.runs.pop(), self.runs.pop()
            self.runs.append(_merge(big, small))


def _merge(big, small):
    """Two sorted runs (no key in both) as one; memory: the result plus one byte per pair."""
    at = np.searchsorted(big[0], small[0]) + np.arange(len(small[0]))  # where the smaller run's keys land
    others = np.ones(len(big[0]) + len(small[0]), dtype=bool)
    others[at] = False
    out = []
    for b, s in zip(big, small):  # keys, first rows, counts (None when not counting)
        if b is None:
            out.append(None)
            continue
        o = np.empty(len(others), b.dtype)
        o[at], o[others] = s, b
        out.append(o)
    return tuple(out)
