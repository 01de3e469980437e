"""Duplicate pairs: the first copy is kept, every later copy goes to rejected_rows as "duplicate of row N".

A pair's identity is its pair_id (a hash of prompt, chosen, rejected as given), so keeping only the first row
of each pair_id keeps pair_id unique in a cache (joins on it never multiply rows) and loses nothing: the later
copies are listed with the row they repeat, and rows read = kept + rejected still holds. The rule depends only
on row order, and every shard streams through all input rows, so each shard makes the same decisions and a
sharded cache equals a single-process one.

Memory: 16 bytes per distinct pair (12 bytes of the 128-bit pair_id and a uint32 row number), in sorted runs
whose sizes at least double; merging two runs briefly holds both and the result (measured: BENCHMARKS.md).
Two different pairs that share the first 96 bits of their pair_id would be taken for copies: at 100 million
pairs the chance is about 6e-14.
"""

import numpy as np

from refcache_base import UserError

KEY = "S12"  # the first 12 bytes of the pair_id


class SeenPairs:
    """pair_id -> the first row that had it, for every row seen so far."""

    def __init__(self):
        self.runs = []  # [(sorted keys, their first rows)], sizes decreasing

    def __len__(self):
        return sum(len(k) for k, _ in self.runs)

    def first_rows(self, pair_ids, rows) -> np.ndarray:
        """For each (pair_id, row), in row order: the first row with that pair_id (the row itself when it is the
        first). Remembers the new ones."""
        if len(rows) == 0:
            return np.zeros(0, dtype=np.int64)
        if rows[-1] >= 2**32:
            raise UserError("more than 4,294,967,295 input rows: split the input and build one cache per part")
        keys = np.array([bytes.fromhex(p)[:12] for p in pair_ids], dtype=KEY)
        rows = np.asarray(rows, dtype=np.uint32)
        uniq, first_pos, inverse = np.unique(keys, return_index=True, return_inverse=True)
        first = rows[first_pos]
        new = np.ones(len(uniq), dtype=bool)
        for run_keys, run_rows in self.runs:  # earlier rows: a key is in at most one run
            pos = np.minimum(np.searchsorted(run_keys, uniq), len(run_keys) - 1)
            hit = run_keys[pos] == uniq
            first = np.where(hit, run_rows[pos], first)
            new &= ~hit
        self._add(uniq[new], first[new])
        return first[inverse].astype(np.int64)

    def _add(self, keys, rows):
        if not len(keys):
            return
        self.runs.append((keys, rows))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            small, big = self.runs.pop(), self.runs.pop()
            self.runs.append(_merge(*big, *small))


def _merge(big_keys, big_rows, keys, rows):
    """Two sorted runs (no key in both) as one; memory: the result plus one byte per pair."""
    at = np.searchsorted(big_keys, keys) + np.arange(len(keys))  # where the smaller run's keys land
    out_keys, out_rows = np.empty(len(big_keys) + len(keys), KEY), np.empty(len(big_keys) + len(keys), np.uint32)
    others = np.ones(len(out_keys), dtype=bool)
    others[at] = False
    out_keys[at], out_rows[at] = keys, rows
    out_keys[others], out_rows[others] = big_keys, big_rows
    return out_keys, out_rows
