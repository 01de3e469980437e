"""`--where`: train on the pairs of a cache that an SQL predicate over the stage-3 `pairs` view keeps.

The predicate runs in DuckDB over the same read-only views `refcache sql` uses (queries.db.connect), so every
column of `pairs` works: the cache's own (prompt_len, chosen_len, shared_prefix_len, ches, ln_ches, ...),
`length_diff`, and the input's own columns the cache kept (category, score_chosen, ...). A pair whose predicate
is NULL (a comparison with a null ln_ches, say) is dropped, as SQL's WHERE does. The eval cache is not filtered.
"""

import hashlib

import duckdb
import numpy as np

from dpo.data import Pairs, take
from refcache_base import UserError


def kept_source_indices(cache: str, where: str) -> tuple[np.ndarray, int]:
    """(source_index of every pair the predicate keeps, pairs in the cache). One-line UserError with DuckDB's
    message for a predicate that does not run, and for one that keeps no pair."""
    from queries.db import check_read_only, connect, one_line

    con = connect(caches=[cache])
    try:
        predicate = str(duckdb.SQLExpression(where))  # one expression, nothing around it (parsed, re-rendered)
        sql = f"SELECT source_index FROM pairs WHERE ({predicate})"
        check_read_only(sql)
        kept = np.asarray([r[0] for r in con.execute(sql).fetchall()], dtype=np.int64)
        total = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        if len(kept) == 0:
            nulls = con.execute(f"SELECT count(*) FROM pairs WHERE ({predicate}) IS NULL").fetchone()[0]
    except (duckdb.Error, UserError) as e:
        raise UserError(f"--where {where!r}: {one_line(e)} (columns: `refcache sql \"DESCRIBE pairs\" "
                        f"--cache {cache}`)") from None
    finally:
        con.close()
    if len(kept) == 0:
        why = (f"; it is NULL for {nulls:,} of them (a column that is null in this cache?)" if nulls else "")
        raise UserError(f"--where {where!r} keeps none of the {total:,} pairs in {cache}{why}")
    return kept, total


def select(pairs: Pairs, where: str) -> tuple[Pairs, dict]:
    """The pairs `where` keeps, in cache order, and what the run config records of them: {cache_pairs, kept,
    dropped, pair_ids_sha256}. The hash pins the subset: a resume whose predicate now keeps other pairs (random(),
    a column that changed) is refused, even with the same count."""
    kept, total = kept_source_indices(pairs.path, where)
    rows = np.flatnonzero(np.isin(pairs.source_index, kept))
    if len(rows) != len(kept) or total != len(pairs):
        raise UserError(f"{pairs.path}: the pairs view and the cache disagree ({len(kept)} kept source indices "
                        f"match {len(rows)} pairs); rebuild the cache with `refcache precompute`")
    taken = take(pairs, rows)
    ids = hashlib.sha256("\n".join(sorted(taken.pair_id.tolist())).encode()).hexdigest()  # pins the subset
    return taken, {"cache_pairs": total, "kept": len(rows), "dropped": total - len(rows), "pair_ids_sha256": ids}
