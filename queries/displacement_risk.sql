-- Displacement risk before training: the pairs of a cache most likely to have DPO push their chosen response down.
--
-- Detects: likelihood displacement before any training, from the reference model alone. Razin et al. 2024
-- ("Unintentional Unalignment", arXiv 2410.08847) show that the pairs whose two completions look alike to the
-- model (high CHES) drive it: a step that lowers the rejected response lowers the chosen one with it.
-- How to read: one row per pair, ranked within its cache by ln_ches (rank 1 = highest = most at risk).
-- ln_ches = <mean h+, mean h-> - ||mean h+||^2 with h the reference model's last-layer hidden states (the LM
-- head's input) at the positions predicting the chosen (+) and rejected (-) tokens; ches = the same with sums
-- (grows with length). top_share = the share of the cache's pairs ranked at or above this one: the paper
-- drops the top 5%, `refcache train --where "ln_ches < (SELECT quantile_cont(ln_ches, 0.95) FROM pairs)"`.
-- Alongside, the older signal: edit_distance = token Levenshtein distance between chosen and rejected,
-- rel_edit = that / the longer completion's length, near_identical = rel_edit <= 0.1 (macros in _shared.sql),
-- and the lengths (length_diff = chosen_len - rejected_len). Needs no run; after training, `refcache query
-- displacement_prediction` says how well this ranking predicted the observed drops. Needs a cache with CHES
-- (both backends compute it unless run with --no-ches; without it ln_ches is null, and this query says why).
-- Cost: the edit distance is computed for the listed pairs only.
--
-- param: limit = 15 [1, ] rows per cache
-- empty: the caches hold no pairs
-- needs: pairs, ches
WITH top AS (
    SELECT * FROM risk WHERE risk_rank <= $limit
)
SELECT t.cache, t.risk_rank AS rank, t.risk_share AS top_share, t.ln_ches, t.ches,
       token_edit_distance(p.chosen_ids, p.rejected_ids) AS edit_distance,
       rel_edit_distance(p.chosen_ids, p.rejected_ids) AS rel_edit,
       near_identical(p.chosen_ids, p.rejected_ids) AS near_identical,
       p.prompt_len, p.chosen_len, p.rejected_len, p.length_diff, t.pair_id
FROM top t JOIN pairs p USING (cache, pair_id)
ORDER BY t.cache, t.risk_rank
