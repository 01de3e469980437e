-- Cache overview: reference log-prob distributions, lengths, truncation and rejected input rows per cache.
--
-- Detects: a cache that will train badly or was built wrong: very low per-token reference log-probs (the
-- reference finds the data unlikely: wrong template/model?), heavy truncation, many near-identical pairs,
-- many rejected input rows.
-- How to read: long format, one row per (cache, metric). *_logp_per_token_* = the pair's summed reference
-- log-prob divided by its completion length (nats per token), mean and p10/p50/p90 over pairs;
-- *_len_* token counts; truncated_share = share of pairs truncation touched; near_identical_share =
-- share of pairs whose shared prefix covers at least `near_share` of the shorter completion or that differ
-- in at most `near_tail` tokens after it (tokens of the longer completion, EOS included);
-- rejected:<reason> = input rows dropped for that reason (see rejected_rows for which).
--
-- param: near_share = 0.5 [0, 1] shared_prefix_len / shorter completion length that counts as near-identical
-- param: near_tail = 3 [0, ] at most this many tokens after the shared prefix also counts as near-identical
-- needs: pairs
WITH pc AS (
    SELECT cache,
           ref_chosen_logp / chosen_len AS c_tok,
           ref_rejected_logp / rejected_len AS r_tok,
           ref_chosen_logp, ref_rejected_logp, prompt_len, chosen_len, rejected_len, shared_prefix_len,
           truncated,
           shared_prefix_len >= $near_share * least(chosen_len, rejected_len)
               OR greatest(chosen_len, rejected_len) - shared_prefix_len <= $near_tail AS near
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
           avg(near::INT) AS near_identical_share,
           avg(truncated::INT) AS truncated_share
    FROM pc GROUP BY cache
),
long AS (
    UNPIVOT wide ON COLUMNS(* EXCLUDE (cache)) INTO NAME metric VALUE value
)
SELECT cache, metric, value::DOUBLE AS value FROM long
UNION ALL
SELECT cache, 'rejected:' || reason AS metric, count(*)::DOUBLE AS value
FROM rejected_rows GROUP BY cache, reason
ORDER BY cache, metric
