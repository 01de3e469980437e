-- Effects above noise: what each run's last probe step shows beyond float rounding and probe sampling.
--
-- Detects: whether a run learned anything at all, and whether the classic failures (chosen log-probs falling,
-- near-identical pairs leading the displacement) are real or within noise. The findings that `refcache
-- report` and `refcache demo` print state only rows with above_noise = true.
-- How to read: one row per run, probe split and metric at probe step `step` (-1 = each run's last probe
-- step): the estimate over n probe pairs with an interval [ci_low, ci_high] of `z` standard errors
-- (1.96: 95%); null_value = the estimate if training had changed nothing; noise = the run's step-0 float
-- noise in the metric's unit (view probe_noise: at step 0 the policy is the reference, so every difference
-- there is rounding); p_value = two-sided normal p-value of (estimate - null_value) / standard error, 1 when
-- |estimate - null_value| <= noise. above_noise = the test passes Holm's step-down correction over ALL the
-- run's tests at family-wise level `alpha` (sort the run's m p-values; the k-th smallest must be <=
-- alpha / (m - k + 1), and so must every smaller one). So a run where nothing happened shows any finding with
-- probability <= alpha; testing each row at 95% alone would flag one of a run's ~11 rows in about 40% of such
-- runs (measured on synthetic runs without learning).
-- Metrics:
--   chosen_drift_mean, rejected_drift_mean   mean policy - reference log-prob (nats); standard error sd/sqrt(n)
--       (normal approximation); null 0; noise drift_noise.
--   margin_mean   mean DPO margin (beta-scaled); as above; null 0; noise margin_noise.
--   accuracy   share of pairs with margin > 0 among the pairs whose |margin| exceeds margin_noise (a sign test:
--       ties at rounding level are left out, n counts the rest); Wilson interval and score test; null 0.5.
--   chosen_fell_share   share of pairs whose chosen log-prob fell among those whose chosen log-prob moved by
--       more than drift_noise; Wilson interval and score test; null 0.5.
--   near_identical_in_top (split 'all')   share of near-identical pairs (macro near_identical: relative token
--       edit distance <= 0.1) among the run's top `top` displaced pairs, ranked as `displacement` ranks them;
--       Wilson interval and score test; null_value = the share among all the run's probe pairs (the base
--       rate): above noise = over- or under-represented. Needs a cache (pairs).
--
-- param: step = -1 [-1, ] probe step to test at; -1 = each run's last probe step
-- param: top = 15 [1, ] displaced pairs ranked for near_identical_in_top (as displacement's limit)
-- param: z = 1.96 [0, ] interval half-width in standard errors (1.96: 95%)
-- param: alpha = 0.05 [0, 1] family-wise error rate of each run's tests (Holm)
-- empty: no probe pairs at that step to test (the runs logged none there: --probe-size 0?)
-- needs: examples
WITH p AS (
    SELECT e.run, e.split, e.step, e.pair_id, e.margin,
           e.policy_chosen_logp - e.ref_chosen_logp AS dc,
           e.policy_rejected_logp - e.ref_rejected_logp AS dr,
           z.drift_noise, z.margin_noise
    FROM probe_rows($step, 'all') e JOIN probe_noise z USING (run)
),
means AS (
    SELECT run, split, any_value(step) AS step, metric, count(*) AS n, avg(v) AS estimate,
           stddev_samp(v) / sqrt(count(*)) AS se, any_value(noise) AS noise
    FROM p, LATERAL (VALUES ('chosen_drift_mean', dc, drift_noise), ('rejected_drift_mean', dr, drift_noise),
                            ('margin_mean', margin, margin_noise)) m(metric, v, noise)
    GROUP BY run, split, metric
),
counts AS (
    SELECT run, split, any_value(step) AS step, 'accuracy' AS metric,
           count(*) FILTER (WHERE abs(margin) > margin_noise) AS n,
           count(*) FILTER (WHERE margin > margin_noise) AS k, 0.5 AS null_value
    FROM p GROUP BY run, split
    UNION ALL
    SELECT run, split, any_value(step), 'chosen_fell_share',
           count(*) FILTER (WHERE abs(dc) > drift_noise),
           count(*) FILTER (WHERE dc < -drift_noise), 0.5
    FROM p GROUP BY run, split
),
near AS (
    SELECT pair_id, any_value(near_identical(chosen_ids, rejected_ids)) AS near
    FROM pairs WHERE pair_id IN (SELECT pair_id FROM p)
    GROUP BY pair_id
),
base AS (
    SELECT run, avg(near::INT) AS base_rate
    FROM (SELECT DISTINCT run, pair_id FROM p) JOIN near USING (pair_id)
    GROUP BY run
),
top AS (
    SELECT d.run, any_value(d.step) AS step, count(*) AS n, count(*) FILTER (WHERE n.near) AS k
    FROM displaced($step, 'all', 0.0) d JOIN near n USING (pair_id)
    WHERE d.rank <= $top
    GROUP BY d.run
),
shares AS (
    SELECT run, split, step, metric, n, k, null_value FROM counts
    UNION ALL
    SELECT t.run, 'all', t.step, 'near_identical_in_top', t.n, t.k, b.base_rate
    FROM top t JOIN base b USING (run)
),
tests AS (
    SELECT run, split, step, metric, n, estimate, estimate - $z * se AS ci_low, estimate + $z * se AS ci_high,
           0.0 AS null_value, noise,
           CASE WHEN abs(estimate) <= noise THEN 0.0 WHEN se = 0 THEN 1e9 ELSE abs(estimate) / se END AS stat,
           [metric, split] AS tiebreak
    FROM means
    UNION ALL
    SELECT run, split, step, metric, n, k / nullif(n, 0), wilson_low(k, n, $z), wilson_high(k, n, $z),
           null_value, 0.0,
           abs(k / nullif(n, 0) - null_value) / nullif(sqrt(null_value * (1 - null_value) / n), 0),
           [metric, split]
    FROM shares
)
SELECT run, split, step, metric, above_noise, estimate, ci_low, ci_high, null_value, p_value, noise, n
FROM holm('tests', $alpha)
ORDER BY run, split,
         list_position(['accuracy', 'margin_mean', 'chosen_drift_mean', 'rejected_drift_mean',
                        'chosen_fell_share', 'near_identical_in_top'], metric)
