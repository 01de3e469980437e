-- Drift and displacement per slice: per value of one of the input's own columns (a category, a source, a score).
--
-- Detects: which kinds of pairs DPO displaces or fails to learn. The cache keeps the input's scalar columns
-- under their own names (`refcache sql "DESCRIBE pairs" --cache CACHE` lists them; a name that clashes with a
-- cache column gets the prefix input_), and this slices the probe pairs by one of them.
-- How to read: one row per run, split and slice at probe step `step` (-1 = each run's last probe step).
-- slice = the value of column `by` ((null) for pairs without one); with bins > 0 the column is cut into `bins`
-- equal-count bins, labelled q1 (lowest) .. with the range of values they hold. n_pairs = probe pairs in the
-- slice. chosen_drift_mean / rejected_drift_mean = mean policy - reference log-prob (nats); margin_mean and
-- accuracy as in `drift`; chosen_down_share = share whose chosen log-prob fell by more than the run's step-0
-- float noise. displaced = pairs whose chosen log-prob fell beyond that noise while their margin grew (the
-- displaced() macro, as `displacement` ranks them); displaced_share with its Wilson 95% interval
-- (displaced_low, displaced_high); run_share = the share over all of the run's probe pairs of that split.
-- stands_out = the interval excludes run_share: this slice is displaced more (or less) than the run as a whole
-- beyond what its sample size allows. With k slices, about k/20 stand out by chance alone; small slices
-- (n_pairs < 10) have wide intervals and rarely stand out. ln_ches_mean = the slice's mean ln-CHES (null
-- where the cache did not compute it).
--
-- param: by = 'category' @pairs column of the pairs view to slice by (e.g. category, source, score_chosen)
-- param: bins = 0 [0, 100] cut the column into this many equal-count bins (for scores); 0 = one slice per value
-- param: step = -1 [-1, ] probe step; -1 = each run's last probe step
-- param: split = 'all' {all, train, eval} which probe pairs
-- empty: no probe pairs at that step to slice (the runs logged none there: --probe-size 0?)
-- needs: examples, pairs
WITH info AS (
    SELECT pair_id, any_value($by) AS value, avg(ln_ches) AS ln_ches FROM pairs GROUP BY pair_id
),
now AS (
    SELECT e.run, e.split, e.step, e.pair_id,
           e.policy_chosen_logp - e.ref_chosen_logp AS dc,
           e.policy_rejected_logp - e.ref_rejected_logp AS dr,
           e.margin, i.value, i.ln_ches,
           d.pair_id IS NOT NULL AS displaced,
           z.drift_noise
    FROM probe_rows($step, $split) e
    JOIN probe_noise z ON z.run = e.run
    LEFT JOIN info i ON i.pair_id = e.pair_id
    LEFT JOIN displaced($step, $split, 0.0) d ON d.run = e.run AND d.split = e.split AND d.pair_id = e.pair_id
),
binned AS (
    SELECT *,
           CASE WHEN $bins > 0 AND value IS NOT NULL
                THEN ntile(greatest($bins, 1)) OVER (PARTITION BY run, split, value IS NULL ORDER BY value, pair_id)
           END AS bin
    FROM now
),
g AS (
    SELECT run, split, step, bin,
           CASE WHEN bin IS NULL THEN value END AS key_value,
           min(value) AS lo, max(value) AS hi,
           count(*) AS n_pairs,
           avg(dc) AS chosen_drift_mean,
           avg(dr) AS rejected_drift_mean,
           avg(margin) AS margin_mean,
           avg(CASE WHEN margin > 0 THEN 1.0 ELSE 0.0 END) AS accuracy,
           avg(CASE WHEN dc < -drift_noise THEN 1.0 ELSE 0.0 END) AS chosen_down_share,
           sum(displaced::INTEGER) AS displaced,
           avg(ln_ches) AS ln_ches_mean
    FROM binned
    GROUP BY run, split, step, bin, CASE WHEN bin IS NULL THEN value END
),
s AS (
    SELECT *,
           displaced / n_pairs AS displaced_share,
           wilson_low(displaced, n_pairs, 1.96) AS displaced_low,
           wilson_high(displaced, n_pairs, 1.96) AS displaced_high,
           sum(displaced) OVER (PARTITION BY run, split) / sum(n_pairs) OVER (PARTITION BY run, split) AS run_share
    FROM g
)
SELECT run, split, step,
       CASE WHEN bin IS NOT NULL THEN 'q' || bin || ' [' || lo::VARCHAR || ', ' || hi::VARCHAR || ']'
            ELSE coalesce(key_value::VARCHAR, '(null)') END AS slice,
       n_pairs, displaced, displaced_share, displaced_low, displaced_high, run_share,
       run_share NOT BETWEEN displaced_low AND displaced_high AS stands_out,
       chosen_drift_mean, rejected_drift_mean, chosen_down_share, margin_mean, accuracy, ln_ches_mean
FROM s
ORDER BY run, split, coalesce(bin, 0), lo NULLS LAST
