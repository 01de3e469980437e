-- Displacement prediction: how well ln-CHES and edit distance, both known before training, predicted the chosen drops.
--
-- Detects: whether the pre-training ranking of `displacement_risk` (ln-CHES, Razin et al. 2024) or the
-- near-identical rule (low relative token edit distance) picked the pairs whose chosen log-prob this run
-- pushed down, i.e. whether dropping the top-ranked pairs (`refcache train --where ...`) is worth trying.
-- How to read: one row per run, predictor and metric at probe step `step` (-1 = each run's last probe step),
-- over the run's probe pairs (both splits). Predictors, each ordered riskiest first: ln_ches (highest first)
-- and rel_edit (lowest relative token edit distance first, macro rel_edit_distance; ties by pair_id).
--   spearman           Spearman rank correlation between the predictor's risk and the chosen drop
--       (reference - policy chosen log-prob, nats; average ranks for ties); > 0 = riskier pairs fell more.
--       A drop within the run's step-0 drift_noise counts as 0 (a tie), so rounding cannot order pairs.
--       Interval and test by Fisher's z, standard error sqrt(1.06 / (n - 3)) (macro spearman_se); null 0.
--   precision_at_top   share of the predictor's `top` riskiest probe pairs that are among the run's top
--       `top` displaced pairs, as `displacement` ranks them (chosen fell beyond noise while the margin grew);
--       Wilson interval and score test against null_value = the share of all the run's probe pairs that are
--       among those displaced pairs (what a random pick gets).
-- above_noise: the rule effects.sql uses: step-0 float noise as above, then Holm's step-down correction over
-- this run's tests at family-wise level `alpha` (p-values two-sided, normal). note: why a row has no
-- estimate (a cache without CHES, and what to do).
--
-- param: step = -1 [-1, ] probe step to test at; -1 = each run's last probe step
-- param: top = 15 [1, ] riskiest pairs picked and displaced pairs ranked (as displacement's limit)
-- param: z = 1.96 [0, ] interval half-width in standard errors (1.96: 95%)
-- param: alpha = 0.05 [0, 1] family-wise error rate of each run's tests (Holm)
-- empty: no probe pairs at that step to rank (the runs logged none there: --probe-size 0?)
-- needs: examples, pairs
WITH p AS (
    SELECT e.run, e.split, e.step, e.pair_id,
           CASE WHEN abs(e.ref_chosen_logp - e.policy_chosen_logp) <= z.drift_noise THEN 0.0
                ELSE e.ref_chosen_logp - e.policy_chosen_logp END AS chosen_drop
    FROM probe_rows($step, 'all') e JOIN probe_noise z USING (run)
),
info AS (
    SELECT pair_id, any_value(ln_ches) AS ln_ches, any_value(rel_edit_distance(chosen_ids, rejected_ids)) AS rel_edit,
           any_value(c.ches_missing) AS ches_missing
    FROM pairs JOIN caches c USING (cache)
    WHERE pair_id IN (SELECT pair_id FROM p)
    GROUP BY pair_id
),
scored AS (  -- risk: higher = predicted to fall more
    SELECT p.*, v.predictor, v.risk
    FROM p JOIN info i USING (pair_id),
         LATERAL (VALUES ('ln_ches', i.ln_ches), ('rel_edit', -i.rel_edit)) v(predictor, risk)
    WHERE v.risk IS NOT NULL
),
ranked AS (
    SELECT *,
           rank() OVER (PARTITION BY run, predictor ORDER BY risk)
               + (count(*) OVER (PARTITION BY run, predictor, risk) - 1) / 2 AS risk_rank,
           rank() OVER (PARTITION BY run, predictor ORDER BY chosen_drop)
               + (count(*) OVER (PARTITION BY run, predictor, chosen_drop) - 1) / 2 AS drop_rank,
           row_number() OVER (PARTITION BY run, predictor ORDER BY risk DESC, pair_id) AS pick
    FROM scored
),
displaced_top AS (
    SELECT run, split, pair_id, true AS hit FROM displaced($step, 'all', 0.0) WHERE rank <= $top
),
per_run AS (
    SELECT r.run, r.predictor, any_value(r.step) AS step, count(*) AS n_pairs,
           corr(r.risk_rank, r.drop_rank) AS rho,
           count(*) FILTER (WHERE r.pick <= $top) AS picked,
           count(*) FILTER (WHERE r.pick <= $top AND d.hit) AS hits,
           count(*) FILTER (WHERE d.hit) AS displaced
    FROM ranked r LEFT JOIN displaced_top d USING (run, split, pair_id)
    GROUP BY r.run, r.predictor
),
frame AS (  -- every run x predictor x metric, so a predictor without scores still has its row and its note
    SELECT run, any_value(step) AS step, predictor, metric,
           CASE WHEN predictor = 'ln_ches' THEN string_agg(DISTINCT ches_missing, '; ') END AS note
    FROM p JOIN info USING (pair_id),
         (VALUES ('ln_ches'), ('rel_edit')) v(predictor), (VALUES ('spearman'), ('precision_at_top')) m(metric)
    GROUP BY run, predictor, metric
),
tests AS (
    SELECT f.run, f.step, f.predictor, f.metric, f.note, r.n_pairs,
           CASE WHEN f.metric = 'spearman' THEN r.n_pairs ELSE r.picked END AS n,
           CASE WHEN f.metric = 'spearman' THEN CASE WHEN NOT isnan(r.rho) THEN r.rho END
                ELSE r.hits / nullif(r.picked, 0) END AS estimate,
           CASE WHEN f.metric = 'spearman' THEN 0.0 ELSE r.displaced / r.n_pairs END AS null_value,
           r.hits, r.picked
    FROM frame f LEFT JOIN per_run r USING (run, predictor)
),
stats AS (
    SELECT *,
           CASE WHEN metric = 'spearman' THEN tanh(atanh(least(estimate, 0.999999)) - $z * spearman_se(n))
                ELSE wilson_low(hits, picked, $z) END AS ci_low,
           CASE WHEN metric = 'spearman' THEN tanh(atanh(greatest(estimate, -0.999999)) + $z * spearman_se(n))
                ELSE wilson_high(hits, picked, $z) END AS ci_high,
           CASE WHEN metric = 'spearman' THEN abs(atanh(greatest(-0.999999, least(estimate, 0.999999))))
                                              / spearman_se(n)
                ELSE abs(estimate - null_value) / nullif(sqrt(null_value * (1 - null_value) / n), 0) END AS stat,
           [predictor, metric] AS tiebreak
    FROM tests
)
SELECT run, step, predictor, metric, above_noise, estimate, ci_low, ci_high, null_value, p_value, n, note
FROM holm('stats', $alpha)
ORDER BY run, list_position(['ln_ches', 'rel_edit'], predictor), list_position(['spearman', 'precision_at_top'], metric)
