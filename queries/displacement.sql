-- Likelihood displacement: probe pairs whose chosen log-prob fell below the reference while the margin grew.
--
-- Detects: the pairs DPO "wins" by making the preferred answer less likely. Near-identical pairs (chosen and
-- rejected share most of their tokens: high shared_prefix_len / prefix_share) are the known culprits: the
-- gradient on the shared tokens cancels and the few differing tokens drag both completions down.
-- How to read: one row per displaced pair and run, ranked (rank 1 = chosen fell most) at probe step `step`
-- (-1 = each run's last probe step). chosen_drift / rejected_drift are policy - reference log-probs (nats);
-- margin_gain is the margin now minus at the run's first probe step. prefix_share = shared_prefix_len /
-- the shorter completion's length; tail_tokens = tokens of the longer completion after the shared prefix
-- (near-identical pairs: high prefix_share or few tail_tokens); length_diff = chosen_len - rejected_len.
-- Pair text: join `pairs` on pair_id.
--
-- param: step = -1 [-1, ] probe step to rank at; -1 = each run's last probe step
-- param: limit = 20 [1, ] rows per run
-- param: split = 'all' {all, train, eval} which probe pairs
-- param: min_margin_gain = 0.0 how much the margin must have grown since the first probe
-- needs: examples, pairs
WITH bounds AS (
    SELECT run, min(step) AS first_step,
           CASE WHEN $step < 0 THEN max(step) ELSE $step END AS at_step
    FROM examples WHERE source = 'probe' GROUP BY run
),
now AS (
    SELECT e.run, e.split, e.step, e.pair_id,
           e.policy_chosen_logp - e.ref_chosen_logp AS chosen_drift,
           e.policy_rejected_logp - e.ref_rejected_logp AS rejected_drift,
           e.margin
    FROM examples e JOIN bounds b ON e.run = b.run AND e.step = b.at_step
    WHERE e.source = 'probe' AND ($split = 'all' OR e.split = $split)
),
first AS (
    SELECT e.run, e.split, e.pair_id, e.margin
    FROM examples e JOIN bounds b ON e.run = b.run AND e.step = b.first_step
    WHERE e.source = 'probe'
),
displaced AS (
    SELECT n.run, n.split, n.step, n.pair_id, n.chosen_drift, n.rejected_drift, n.margin,
           n.margin - f.margin AS margin_gain,
           row_number() OVER (PARTITION BY n.run ORDER BY n.chosen_drift, n.pair_id) AS rank
    FROM now n JOIN first f USING (run, split, pair_id)
    WHERE n.chosen_drift < 0 AND n.margin - f.margin > $min_margin_gain
),
pair_info AS (
    SELECT pair_id, any_value(cache) AS cache, any_value(shared_prefix_len) AS shared_prefix_len,
           any_value(chosen_len) AS chosen_len, any_value(rejected_len) AS rejected_len
    FROM pairs WHERE pair_id IN (SELECT pair_id FROM displaced WHERE rank <= $limit)
    GROUP BY pair_id
)
SELECT d.run, d.rank, d.split, d.step, d.pair_id, d.chosen_drift, d.rejected_drift, d.margin, d.margin_gain,
       i.shared_prefix_len,
       i.shared_prefix_len / least(i.chosen_len, i.rejected_len) AS prefix_share,
       greatest(i.chosen_len, i.rejected_len) - i.shared_prefix_len AS tail_tokens,
       i.chosen_len, i.rejected_len, i.chosen_len - i.rejected_len AS length_diff, i.cache
FROM displaced d LEFT JOIN pair_info i USING (pair_id)
WHERE d.rank <= $limit
ORDER BY d.run, d.rank
