-- Drift of the policy away from the reference on the probe pairs, per run, split and probe step.
--
-- Detects: likelihood displacement in aggregate. DPO only pushes the margin up; it can do that by lowering
-- both log-probs. A falling chosen_drift_mean with a rising margin, a growing both_down_share and a
-- chosen_up_share near 0 mean the "preferred" answers are getting *less* likely as training "succeeds".
-- How to read: chosen_drift_* / rejected_drift_* are policy - reference summed completion log-probs (nats)
-- over the probe pairs scored at that step (after `step` updates; step 0 is the reference itself, all 0);
-- p10/p50/p90 are quantiles over pairs. both_down_share = share of pairs whose chosen AND rejected log-prob
-- fell by more than the threshold; chosen_down_share / chosen_up_share = share whose chosen log-prob fell /
-- rose by more than it. The threshold is `tol` or the run's step-0 float noise (drift_noise in view
-- probe_noise), whichever is larger, so rounding never counts as a move.
-- margin_mean is the mean DPO margin (beta-scaled), accuracy the share of pairs with margin > 0 (as in
-- steps.parquet; at step 0 the margins are floating-point noise around 0, so accuracy there means nothing).
--
-- param: tol = 0.001 [0, ] nats a log-prob must move to count as fallen or risen (at least the step-0 noise)
-- empty: the runs logged no probe pairs (trained with --probe-size 0?)
-- needs: examples
WITH p AS (
    SELECT run, split, step,
           policy_chosen_logp - ref_chosen_logp AS dc,
           policy_rejected_logp - ref_rejected_logp AS dr,
           margin, loss,
           greatest($tol, z.drift_noise) AS thr
    FROM examples JOIN probe_noise z USING (run)
    WHERE source = 'probe'
),
g AS (
    SELECT run, split, step,
           count(*) AS n_pairs,
           avg(dc) AS chosen_drift_mean,
           quantile_cont(dc, [0.1, 0.5, 0.9]) AS qc,
           avg(dr) AS rejected_drift_mean,
           quantile_cont(dr, [0.1, 0.5, 0.9]) AS qr,
           avg(CASE WHEN dc < -thr AND dr < -thr THEN 1.0 ELSE 0.0 END) AS both_down_share,
           avg(CASE WHEN dc < -thr THEN 1.0 ELSE 0.0 END) AS chosen_down_share,
           avg(CASE WHEN dc > thr THEN 1.0 ELSE 0.0 END) AS chosen_up_share,
           avg(margin) AS margin_mean,
           avg(CASE WHEN margin > 0 THEN 1.0 ELSE 0.0 END) AS accuracy,
           avg(loss) AS loss_mean
    FROM p
    GROUP BY run, split, step
)
SELECT run, split, step, n_pairs, chosen_drift_mean, rejected_drift_mean, margin_mean, accuracy,
       both_down_share, chosen_down_share, chosen_up_share, loss_mean,
       qc[1] AS chosen_drift_p10, qc[2] AS chosen_drift_p50, qc[3] AS chosen_drift_p90,
       qr[1] AS rejected_drift_p10, qr[2] AS rejected_drift_p50, qr[3] AS rejected_drift_p90
FROM g
ORDER BY run, split, step
