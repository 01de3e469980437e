-- Shared definitions the diagnostics use (not a diagnostic: `queries.db.connect` creates these after the views).
-- Each fact is defined here once; `refcache sql` can use them too.
--
-- token_edit_distance(a, b)  Levenshtein distance between two token-id lists: the fewest single-token
--     insertions, deletions and substitutions that turn a into b. Ids map one-to-one onto Unicode code points
--     (id + 0xE000, above the surrogates) so DuckDB's levenshtein() counts tokens, not bytes. O(len a * len b).
-- rel_edit_distance(a, b)    token_edit_distance / the longer list's length, in [0, 1]: 0 = identical,
--     1 = nothing in common. E.g. "... So the answer is 33.<eos>" vs "... is 32.<eos>" (30 tokens, one
--     differs) = 0.03; " 94<eos>" vs " 115<eos>" = 0.75.
-- near_identical(a, b)       rel_edit_distance(a, b) <= near_identical_max() = 0.1: at most one token in ten
--     differs. The rule the diagnostics and findings use for "near-identical" pairs (on the embedded train set
--     it covers 20% of pairs).
-- wilson_low(k, n, z), wilson_high(k, n, z)  Wilson score interval of a share k/n at z standard errors
--     (z = 1.96: 95%); sound for small n and for shares near 0 or 1, unlike k/n +- z*sqrt(p(1-p)/n).
--     NULL when n = 0.
--
-- normal_p(x)               two-sided p-value of a standard-normal statistic x >= 0, erfc(x / sqrt 2), by
--     Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7).
--
-- probe_noise (view)         per run, the float noise of the probe scores, measured at step 0 where the
--     policy IS the reference so every difference is rounding (batching, padding, kernels): drift_noise =
--     the largest |policy - reference| log-prob (chosen or rejected, nats), margin_noise = the largest |margin|,
--     reward_noise = the largest |chosen or rejected reward|, over the step-0 probe rows. A run without step-0
--     probes gets 0. A log-prob "moved" only when it moved by more than drift_noise.
--
-- probe_rows(probe_step, probe_split)  (table macro) the examples rows of the probes at probe step probe_step
--     (-1 = each run's last probe step), split probe_split ('all', 'train', 'eval'); the columns of examples.
--
-- displaced(probe_step, probe_split, min_gain)  (table macro) probe pairs whose chosen log-prob fell below
--     the reference by more than the run's drift_noise while the margin grew by more than
--     greatest(min_gain, margin_noise) since the run's first probe; at probe step probe_step (-1 = each run's
--     last), split probe_split ('all', 'train', 'eval'); ranked per run, rank 1 = chosen fell most.
--     Columns: run, split, step, pair_id, chosen_drift, rejected_drift, margin, margin_gain, rank.
--
-- risk (view)                the cache pairs that have CHES scores, ranked before any training: cache, pair_id,
--     ches, ln_ches, risk_rank = rank by ln_ches within its cache (1 = highest = most likely to displace the
--     chosen response; ties by pair_id), risk_share = risk_rank / the cache's pairs with CHES (0.05 = in the
--     top 5%). Pairs of a cache without CHES (caches.ches_missing says why) are not in it.
-- spearman_se(n)             standard error of atanh(Spearman's rho) over n pairs, sqrt(1.06 / (n - 3))
--     (Fieller, Hartley & Pearson 1957); NULL when n <= 3.

CREATE MACRO token_edit_distance(a, b) AS
    levenshtein(array_to_string(list_transform(a, lambda x: chr((x + 57344)::INTEGER)), ''),
                array_to_string(list_transform(b, lambda x: chr((x + 57344)::INTEGER)), ''));

CREATE MACRO rel_edit_distance(a, b) AS
    token_edit_distance(a, b) / greatest(len(a), len(b), 1);

CREATE MACRO near_identical_max() AS 0.1;

CREATE MACRO near_identical(a, b) AS rel_edit_distance(a, b) <= near_identical_max();

CREATE MACRO wilson_low(k, n, z) AS  -- k = 0: exactly 0 (the formula leaves ~3e-17 of rounding)
    CASE WHEN n > 0 AND k = 0 THEN 0.0 WHEN n > 0 THEN greatest(0.0, (k / n + z * z / (2 * n) - z * sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)))
                         / (1 + z * z / n)) END;

CREATE MACRO wilson_high(k, n, z) AS  -- k = n: exactly 1
    CASE WHEN n > 0 AND k = n THEN 1.0 WHEN n > 0 THEN least(1.0, (k / n + z * z / (2 * n) + z * sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)))
                         / (1 + z * z / n)) END;

CREATE MACRO erfc_as(t, y) AS
    t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    * exp(-y * y);

CREATE MACRO normal_p(x) AS least(1.0, erfc_as(1 / (1 + 0.3275911 * x / sqrt(2)), x / sqrt(2)));

CREATE VIEW probe_noise AS
SELECT r.run,
       coalesce(n.drift_noise, 0) AS drift_noise,
       coalesce(n.margin_noise, 0) AS margin_noise,
       coalesce(n.reward_noise, 0) AS reward_noise
FROM (SELECT DISTINCT run FROM examples) r
LEFT JOIN (
    SELECT run,
           max(greatest(abs(policy_chosen_logp - ref_chosen_logp),
                        abs(policy_rejected_logp - ref_rejected_logp))) AS drift_noise,
           max(abs(margin)) AS margin_noise,
           max(greatest(abs(chosen_reward), abs(rejected_reward))) AS reward_noise
    FROM examples
    WHERE source = 'probe' AND step = 0
    GROUP BY run
) n USING (run);

CREATE MACRO probe_rows(probe_step, probe_split) AS TABLE
SELECT e.*
FROM examples e
JOIN (SELECT run, max(step) AS last_step FROM examples WHERE source = 'probe' GROUP BY run) b
  ON e.run = b.run AND e.step = CASE WHEN probe_step < 0 THEN b.last_step ELSE probe_step END
WHERE e.source = 'probe' AND (probe_split = 'all' OR e.split = probe_split);

CREATE MACRO displaced(probe_step, probe_split, min_gain) AS TABLE
WITH now AS (
    SELECT run, split, step, pair_id,
           policy_chosen_logp - ref_chosen_logp AS chosen_drift,
           policy_rejected_logp - ref_rejected_logp AS rejected_drift,
           margin
    FROM probe_rows(probe_step, probe_split)
),
first AS (
    SELECT e.run, e.split, e.pair_id, e.margin
    FROM examples e
    JOIN (SELECT run, min(step) AS step FROM examples WHERE source = 'probe' GROUP BY run) b USING (run, step)
    WHERE e.source = 'probe'
)
SELECT n.run, n.split, n.step, n.pair_id, n.chosen_drift, n.rejected_drift, n.margin,
       n.margin - f.margin AS margin_gain,
       row_number() OVER (PARTITION BY n.run ORDER BY n.chosen_drift, n.pair_id) AS rank
FROM now n
JOIN first f USING (run, split, pair_id)
JOIN probe_noise z USING (run)
WHERE n.chosen_drift < -z.drift_noise AND n.margin - f.margin > greatest(min_gain, z.margin_noise);

CREATE VIEW risk AS
SELECT cache, pair_id, ches, ln_ches,
       row_number() OVER w AS risk_rank,
       row_number() OVER w / count(*) OVER (PARTITION BY cache) AS risk_share
FROM pairs
WHERE ln_ches IS NOT NULL
WINDOW w AS (PARTITION BY cache ORDER BY ln_ches DESC, pair_id);

CREATE MACRO spearman_se(n) AS CASE WHEN n > 3 THEN sqrt(1.06 / (n - 3)) END;

-- The findings rule's multiple-testing step (effects.sql says why): Holm's step-down correction over each run's
-- tests at family-wise level `alpha`. `tbl` names a table or CTE with columns run, stat (|z|; null = no test) and
-- tiebreak (orders equal p-values); adds p_value and above_noise: the k-th smallest of the run's m p-values must
-- be <= alpha / (m - k + 1), and so must every smaller one.
CREATE MACRO holm(tbl, alpha) AS TABLE
SELECT * EXCLUDE (k, m),
       coalesce(bool_and(coalesce(p_value <= alpha / (m - k + 1), false)) OVER (
           PARTITION BY run ORDER BY k ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW), false) AS above_noise
FROM (SELECT *, normal_p(stat) AS p_value,
             row_number() OVER (PARTITION BY run ORDER BY normal_p(stat) NULLS LAST, tiebreak) AS k,
             count(stat) OVER (PARTITION BY run) AS m
      FROM query_table(tbl));
