-- Run comparison: several runs (e.g. a beta sweep over one cache) side by side at the same probe step.
--
-- Detects: which setting keeps the chosen answers likely while separating the pairs; whether a larger beta
-- or another loss avoids the collapse/displacement seen in a baseline.
-- How to read: one row per run and probe split at `step` (-1 = the latest probe step that every run has
-- reached). Drift columns are policy - reference log-probs (nats) averaged over the probe pairs; margin and
-- accuracy as in `drift`. final_* come from steps.parquet: the mean batch loss and accuracy over the
-- run's last `tail` optimizer steps. loss/beta/lr come from each run's config.json.
--
-- param: step = -1 [-1, ] probe step to compare at; -1 = the last probe step common to all runs
-- param: tol = 0.001 [0, ] nats a log-prob must move to count as fallen or risen (at least the step-0 noise)
-- param: tail = 10 [1, ] optimizer steps averaged for final_loss / final_accuracy
-- empty: no probe step that every run has reached (or none at that step)
-- needs: examples
WITH probe_steps AS (
    SELECT DISTINCT run, step FROM examples WHERE source = 'probe'
),
target AS (
    SELECT CASE WHEN $step >= 0 THEN $step ELSE (
        SELECT max(step) FROM (SELECT step FROM probe_steps GROUP BY step
                               HAVING count(*) = (SELECT count(DISTINCT run) FROM probe_steps)))
    END AS at_step
),
at_step AS (
    SELECT e.run, e.split, e.step,
           count(*) AS n_pairs,
           avg(e.policy_chosen_logp - e.ref_chosen_logp) AS chosen_drift_mean,
           avg(e.policy_rejected_logp - e.ref_rejected_logp) AS rejected_drift_mean,
           avg((e.policy_chosen_logp - e.ref_chosen_logp < -greatest($tol, z.drift_noise)
                AND e.policy_rejected_logp - e.ref_rejected_logp < -greatest($tol, z.drift_noise))::INT)
               AS both_down_share,
           avg((e.policy_chosen_logp - e.ref_chosen_logp > greatest($tol, z.drift_noise))::INT) AS chosen_up_share,
           avg(e.margin) AS margin_mean,
           avg((e.margin > 0)::INT) AS accuracy,
           avg(e.loss) AS loss_mean
    FROM examples e JOIN target t ON e.step = t.at_step JOIN probe_noise z ON z.run = e.run
    WHERE e.source = 'probe'
    GROUP BY e.run, e.split, e.step
),
tails AS (
    SELECT run, avg(loss) AS final_loss, avg(reward_accuracy) AS final_accuracy, max(step) AS last_step
    FROM (SELECT run, step, loss, reward_accuracy,
                 row_number() OVER (PARTITION BY run ORDER BY step DESC) AS k FROM steps)
    WHERE k <= $tail
    GROUP BY run
)
SELECT p.run, r.loss, r.beta, r.lr, p.split, p.step, p.n_pairs,
       p.chosen_drift_mean, p.rejected_drift_mean, p.both_down_share, p.chosen_up_share,
       p.margin_mean, p.accuracy, p.loss_mean,
       t.final_loss, t.final_accuracy, t.last_step AS last_train_step
FROM at_step p
LEFT JOIN runs r ON r.run = p.run
LEFT JOIN tails t ON t.run = p.run
ORDER BY r.loss, r.beta, p.run, p.split
