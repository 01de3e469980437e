-- Train vs eval gap per probe step: margin, accuracy, drift and loss on train-split vs eval-split probe pairs.
--
-- Detects: memorisation. A margin/accuracy that climbs on train probes but not on eval probes, or chosen
-- log-probs that hold up on train pairs but fall on eval pairs, means the run fits its pairs rather than
-- the preference.
-- How to read: per run and probe step, train_* and eval_* are means over that split's probe pairs;
-- *_gap = eval - train (negative margin_gap / accuracy_gap: eval lags). Drift columns are policy -
-- reference log-probs (nats). NULL on one side where a run has no probe pairs from that split.
--
-- empty: the runs logged no probe pairs (trained with --probe-size 0?)
-- needs: examples
WITH g AS (
    SELECT run, step, split,
           count(*) AS n,
           avg(margin) AS margin,
           avg((margin > 0)::INT) AS accuracy,
           avg(policy_chosen_logp - ref_chosen_logp) AS chosen_drift,
           avg(policy_rejected_logp - ref_rejected_logp) AS rejected_drift,
           avg(loss) AS loss
    FROM examples
    WHERE source = 'probe'
    GROUP BY run, step, split
),
w AS (
    SELECT run, step,
           coalesce(sum(n) FILTER (WHERE split = 'train'), 0)::BIGINT AS train_pairs,
           coalesce(sum(n) FILTER (WHERE split = 'eval'), 0)::BIGINT AS eval_pairs,
           any_value(margin) FILTER (WHERE split = 'train') AS train_margin,
           any_value(margin) FILTER (WHERE split = 'eval') AS eval_margin,
           any_value(accuracy) FILTER (WHERE split = 'train') AS train_accuracy,
           any_value(accuracy) FILTER (WHERE split = 'eval') AS eval_accuracy,
           any_value(chosen_drift) FILTER (WHERE split = 'train') AS train_chosen_drift,
           any_value(chosen_drift) FILTER (WHERE split = 'eval') AS eval_chosen_drift,
           any_value(rejected_drift) FILTER (WHERE split = 'train') AS train_rejected_drift,
           any_value(rejected_drift) FILTER (WHERE split = 'eval') AS eval_rejected_drift,
           any_value(loss) FILTER (WHERE split = 'train') AS train_loss,
           any_value(loss) FILTER (WHERE split = 'eval') AS eval_loss
    FROM g GROUP BY run, step
)
SELECT *,
       eval_margin - train_margin AS margin_gap,
       eval_accuracy - train_accuracy AS accuracy_gap,
       eval_chosen_drift - train_chosen_drift AS chosen_drift_gap,
       eval_loss - train_loss AS loss_gap
FROM w
ORDER BY run, step
