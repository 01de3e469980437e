-- Cache overview: reference log-prob distributions, lengths, truncation and rejected input rows per cache.
--
-- Detects: a cache that will train badly or was built wrong: very low per-token reference log-probs (the
-- reference finds the data unlikely: wrong template/model?), heavy truncation, many near-identical pairs,
-- many rejected input rows.
-- How to read: long format, one row per (cache, metric). *_logp_per_token_* = the pair's summed reference
-- log-prob divided by its completion length (nats per token), mean and p10/p50/p90 over pairs;
-- *_len_* token counts; truncated_share = share of pairs truncation touched; rel_edit_mean = mean relative
-- token edit distance between chosen and rejected (macro rel_edit_distance: 0 = identical, 1 = nothing
-- shared); near_identical_share = share of pairs with rel_edit <= 0.1 (macro near_identical), the base rate
-- the displacement findings compare against; rejected:<kind> = input rows dropped for that kind of reason
-- (rejected_rows.reason_kind; the reason text itself for a cache written before kinds; see rejected_rows for which). Cost: the edit distance is O(chosen_len * rejected_len) per pair (about 1 s per
-- 1,000 pairs of 300 tokens each on one core).
--
-- empty: the caches hold no pairs and no rejected rows
-- needs: pairs
WITH pc AS (
    SELECT cache,
           ref_chosen_logp / chosen_len AS c_tok,
           ref_rejected_logp / rejected_len AS r_tok,
           ref_chosen_logp, ref_rejected_logp, prompt_len, chosen_len, rejected_len, shared_prefix_len,
           truncated,
           rel_edit_distance(chosen_ids, rejected_ids) AS rel_edit
    FROM pairs
),
wide AS (
    SELECT cache,
           count(*)::DOUBLE AS n_pairs,
           avg(c_tok) AS chosen_logp_per_token_mean,
           quantile_cont(c_tok, 0.1) AS chosen_logp_per_token_p10,
           quantile_cont(c_tok, 0.5) AS chosen_logp_per_token_p50,
           quantile_cont(c_tok, 0.9) AS chosen_logp_per_token_p90,
           avg(r_tok) AS rejected_logp_per_token_mean,
           quantile_cont(r_tok, 0.1) AS rejected_logp_per_token_p10,
           quantile_cont(r_tok, 0.5) AS rejected_logp_per_token_p50,
           quantile_cont(r_tok, 0.9) AS rejected_logp_per_token_p90,
           avg(ref_chosen_logp) AS chosen_logp_sum_mean,
           avg(ref_rejected_logp) AS rejected_logp_sum_mean,
           avg(prompt_len) AS prompt_len_mean,
           quantile_cont(prompt_len, 0.5) AS prompt_len_p50,
           max(prompt_len)::DOUBLE AS prompt_len_max,
           avg(chosen_len) AS chosen_len_mean,
           quantile_cont(chosen_len, 0.5) AS chosen_len_p50,
           max(chosen_len)::DOUBLE AS chosen_len_max,
           avg(rejected_len) AS rejected_len_mean,
           quantile_cont(rejected_len, 0.5) AS rejected_len_p50,
           max(rejected_len)::DOUBLE AS rejected_len_max,
           avg(shared_prefix_len) AS shared_prefix_len_mean,
           avg(rel_edit) AS rel_edit_mean,
           avg((rel_edit <= near_identical_max())::INT) AS near_identical_share,
           avg(truncated::INT) AS truncated_share
    FROM pc GROUP BY cache
),
long AS (
    UNPIVOT wide ON COLUMNS(* EXCLUDE (cache)) INTO NAME metric VALUE value
)
SELECT cache, metric, value::DOUBLE AS value FROM long
UNION ALL
SELECT cache, 'rejected:' || coalesce(reason_kind, reason) AS metric, count(*)::DOUBLE AS value
FROM rejected_rows GROUP BY cache, coalesce(reason_kind, reason)
ORDER BY cache, metric
