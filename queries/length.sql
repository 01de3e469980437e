-- Length exploitation: does the margin grow with the length difference, summed vs per-token-normalised?
--
-- Detects: DPO on summed log-probs can raise the margin just by favouring the longer (or shorter) answer.
-- How to read: per run, split and step, corr_summed = correlation over pairs of the margin with
-- length_diff = chosen_len - rejected_len; corr_per_token = the same for the per-token-normalised margin
-- (chosen_reward / chosen_len - rejected_reward / rejected_len). corr_summed rising over training while
-- corr_per_token stays near 0 means the margin is bought with length, not content. slope_summed = margin
-- gained per token of length difference (least squares). Correlations and slope are NULL where they would
-- measure rounding: at step 0 (the policy is the reference) and wherever every |margin| is within the run's
-- step-0 margin noise (view probe_noise); also where the length difference is constant.
--
-- param: source = 'probe' {probe, train} probe pairs (fixed set) or the training batches
-- empty: no pairs of that source at any step (probe: trained with --probe-size 0?)
-- needs: examples
WITH g AS (
    SELECT run, split, step,
           count(*) AS n_pairs,
           avg(chosen_len - rejected_len) AS length_diff_mean,
           avg(margin) AS margin_mean,
           corr(margin, chosen_len - rejected_len) AS c1,
           corr(chosen_reward / chosen_len - rejected_reward / rejected_len, chosen_len - rejected_len) AS c2,
           regr_slope(margin, chosen_len - rejected_len) AS slope_summed,
           step = 0 OR max(abs(margin)) <= any_value(z.margin_noise) AS noise_only
    FROM examples JOIN probe_noise z USING (run)
    WHERE source = $source
    GROUP BY run, split, step
)
SELECT run, split, step, n_pairs, length_diff_mean, margin_mean,
       CASE WHEN isnan(c1) OR noise_only THEN NULL ELSE c1 END AS corr_summed,
       CASE WHEN isnan(c2) OR noise_only THEN NULL ELSE c2 END AS corr_per_token,
       CASE WHEN noise_only THEN NULL ELSE slope_summed END AS slope_summed
FROM g
ORDER BY run, split, step
