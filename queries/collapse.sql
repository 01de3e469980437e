-- Reward-collapse alarm: mean chosen reward falls for several probes in a row while accuracy stays high.
--
-- Detects: the run keeps "winning" (accuracy >= min_accuracy) while the chosen answers' reward (beta *
-- (policy - reference) log-prob) keeps dropping: the policy is separating the pair by pushing everything down.
-- How to read: one row per alarm window, per run and probe split. peak_step is the last probe before the
-- fall; start_step the first probe that fell; alarm_step the probe at which the fall reached `min_falls`
-- consecutive probes (when the alarm fires); end_step the last falling probe (still_falling = it is the
-- run's latest probe). chosen_reward_drop = reward at peak_step minus at end_step. A probe "falls" when its
-- mean chosen reward is below the previous probe's by more than the run's step-0 reward noise (reward_noise
-- in view probe_noise); a probe that falls but with accuracy below min_accuracy ends the window. No rows =
-- no alarm.
--
-- param: min_falls = 3 [1, ] consecutive probe-to-probe falls that raise the alarm
-- param: min_accuracy = 0.8 [0, 1] accuracy every falling probe must reach
-- empty: no collapse alarm (no probe split's mean chosen reward fell min_falls probes in a row while accuracy held)
-- needs: examples
WITH per_probe AS (
    SELECT run, split, step,
           avg(chosen_reward) AS chosen_reward,
           avg(CASE WHEN margin > 0 THEN 1.0 ELSE 0.0 END) AS accuracy
    FROM examples
    WHERE source = 'probe'
    GROUP BY run, split, step
),
flagged AS (
    SELECT p.*,
           coalesce(chosen_reward < lag(chosen_reward) OVER w - z.reward_noise
                    AND accuracy >= $min_accuracy, false) AS falls,
           max(step) OVER (PARTITION BY run, split) AS last_step
    FROM per_probe p JOIN probe_noise z USING (run)
    WINDOW w AS (PARTITION BY run, split ORDER BY step)
),
islands AS (
    SELECT *, sum(CASE WHEN falls THEN 0 ELSE 1 END) OVER (PARTITION BY run, split ORDER BY step) AS island
    FROM flagged
),
windows AS (
    SELECT run, split, island,
           min(step) AS peak_step,
           min(step) FILTER (WHERE falls) AS start_step,
           list(step ORDER BY step) AS steps_in_window,
           max(step) AS end_step,
           count(*) FILTER (WHERE falls) AS n_falls,
           arg_min(chosen_reward, step) AS peak_chosen_reward,
           arg_max(chosen_reward, step) AS end_chosen_reward,
           min(accuracy) FILTER (WHERE falls) AS min_accuracy,
           avg(accuracy) FILTER (WHERE falls) AS mean_accuracy,
           any_value(last_step) AS last_step
    FROM islands
    GROUP BY run, split, island
)
SELECT run, split, start_step, steps_in_window[$min_falls + 1] AS alarm_step, peak_step, end_step, n_falls,
       peak_chosen_reward, end_chosen_reward, peak_chosen_reward - end_chosen_reward AS chosen_reward_drop,
       min_accuracy, mean_accuracy, end_step = last_step AS still_falling
FROM windows
WHERE n_falls >= $min_falls
ORDER BY run, split, start_step
