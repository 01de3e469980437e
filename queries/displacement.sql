-- Likelihood displacement: probe pairs whose chosen log-prob fell below the reference while the margin grew.
--
-- Detects: the pairs DPO "wins" by making the preferred answer less likely. Near-identical pairs (chosen and
-- rejected differ in few tokens) are the known culprits: the gradient on the shared tokens cancels and the
-- few differing tokens drag both completions down. Whether they really lead here is a question of base
-- rates: compare near_identical among these rows with its share of all probe pairs (`refcache query effects`
-- does, with an interval).
-- How to read: one row per displaced pair and run, ranked (rank 1 = chosen fell most) at probe step `step`
-- (-1 = each run's last probe step). chosen_drift / rejected_drift are policy - reference log-probs (nats);
-- margin_gain is the margin now minus at the run's first probe step. A pair counts only when its chosen
-- log-prob fell by more than the run's step-0 float noise and its margin grew by more than the step-0 margin
-- noise (view probe_noise in _shared.sql). edit_distance = token Levenshtein distance between chosen and
-- rejected; rel_edit = that / the longer completion's length (0 = identical, 1 = nothing shared);
-- near_identical = rel_edit <= 0.1; ln_ches = the pair's ln-CHES and risk_share its standing in its cache
-- before training (view risk: 0.05 = among the 5% most at risk; null without CHES), as `displacement_risk`
-- ranks them; how well ln_ches and rel_edit predicted these rows: `refcache query displacement_prediction`.
-- length_diff = chosen_len - rejected_len. Pair text: join `pairs` on pair_id.
--
-- param: step = -1 [-1, ] probe step to rank at; -1 = each run's last probe step
-- param: limit = 15 [1, ] rows per run
-- param: split = 'all' {all, train, eval} which probe pairs
-- param: min_margin_gain = 0.0 how much the margin must have grown since the first probe
-- empty: no displaced pairs (no probe pair's chosen log-prob fell beyond the step-0 noise while its margin grew)
-- needs: examples, pairs
WITH top AS (
    SELECT * FROM displaced($step, $split, $min_margin_gain) WHERE rank <= $limit
),
pair_info AS (
    SELECT *, edit_distance / greatest(chosen_len, rejected_len, 1) AS rel_edit,
           edit_distance / greatest(chosen_len, rejected_len, 1) <= near_identical_max() AS near_identical
    FROM (SELECT pair_id, any_value(cache) AS cache, any_value(shared_prefix_len) AS shared_prefix_len,
                 any_value(chosen_len) AS chosen_len, any_value(rejected_len) AS rejected_len,
                 any_value(token_edit_distance(chosen_ids, rejected_ids)) AS edit_distance
          FROM pairs WHERE pair_id IN (SELECT pair_id FROM top)
          GROUP BY pair_id)
)
SELECT d.run, d.rank, d.split, d.step, d.chosen_drift, d.rejected_drift, d.margin_gain, i.edit_distance,
       i.rel_edit, i.near_identical, r.ln_ches, r.risk_share, i.chosen_len - i.rejected_len AS length_diff,
       d.margin, i.shared_prefix_len, i.chosen_len, i.rejected_len, d.pair_id, i.cache
FROM top d LEFT JOIN pair_info i USING (pair_id) LEFT JOIN risk r USING (cache, pair_id)
ORDER BY d.run, d.rank
