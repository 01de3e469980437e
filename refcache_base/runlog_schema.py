"""The stage-2 run-directory log schema (../shared/design.md, "Stage 2 run directory").

runs/<name>/steps.parquet      one row per optimizer step (STEPS_SCHEMA)
runs/<name>/examples/*.parquet one row per (step, pair) (EXAMPLES_SCHEMA)
runs/<name>/evals.parquet      one row per full pass over the eval cache (--eval-every; EVALS_SCHEMA)
runs/<name>/config.json        resolved config, incl. the cache fingerprint(s) trained against, and with --where the
                               predicate (`where`) and its counts (`where_pairs`: cache_pairs, kept, dropped)
runs/<name>/summary.json       written at the end: final numbers
runs/<name>/tensorboard/       --report-to tensorboard: event files, the TRL_METRICS below (dpo/dashboards.py)
runs/<name>/wandb/             --report-to wandb: W&B's run directories (offline where no login exists)

Step convention: the `steps` row with step=s holds the batch loss computed with the weights *before* update s
(so step 0 on a policy equal to the reference has loss ln 2). A `probe` row with step=s was scored with the
weights after s updates (step 0 = initial weights, all rewards 0). `train` rows in `examples` are the pairs of
the batch of step s, with the values from that step's forward pass. An `evals` row with step=s, like a probe,
was scored with the weights after s updates, over every pair of the eval cache.
"""

import pyarrow as pa

STEPS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.float64()),  # fractional epoch at the start of the step
        ("lr", pa.float64()),
        ("loss", pa.float64()),
        ("grad_norm", pa.float64()),  # before clipping
        ("reward_chosen", pa.float64()),  # batch means of beta * (policy - ref)
        ("reward_rejected", pa.float64()),
        ("reward_margin", pa.float64()),
        ("reward_accuracy", pa.float64()),  # share of pairs with chosen reward > rejected reward
        ("policy_chosen_logp", pa.float64()),  # batch means of summed completion log-probs
        ("policy_rejected_logp", pa.float64()),
        ("ref_chosen_logp", pa.float64()),
        ("ref_rejected_logp", pa.float64()),
        ("tokens", pa.int64()),  # non-pad tokens in the step's forward passes
        ("seconds", pa.float64()),  # wall time of the step
        ("samples_per_s", pa.float64()),
    ]
)

EXAMPLES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("source", pa.string()),  # 'train' (pairs of that step's batch) or 'probe' (fixed subset, every K steps)
        ("split", pa.string()),  # which data the pair belongs to: 'train' or 'eval'
        ("pair_id", pa.string()),
        ("policy_chosen_logp", pa.float64()),
        ("policy_rejected_logp", pa.float64()),
        ("ref_chosen_logp", pa.float64()),
        ("ref_rejected_logp", pa.float64()),
        ("chosen_reward", pa.float64()),  # beta * (policy_chosen_logp - ref_chosen_logp)
        ("rejected_reward", pa.float64()),
        ("margin", pa.float64()),  # chosen_reward - rejected_reward
        ("loss", pa.float64()),  # per-example loss
        ("chosen_len", pa.int32()),
        ("rejected_len", pa.int32()),
    ]
)

# TRL's eval metrics (eval_loss, eval_rewards/chosen, .../rejected, .../margins, .../accuracies, eval_logps/chosen,
# .../rejected) under the names steps.parquet uses, each a mean over all `pairs` of the eval cache.
EVALS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("step", pa.int64()),  # updates done before the pass
        ("epoch", pa.float64()),
        ("split", pa.string()),  # 'eval'
        ("pairs", pa.int64()),  # pairs scored: the whole eval cache
        ("loss", pa.float64()),
        ("reward_chosen", pa.float64()),
        ("reward_rejected", pa.float64()),
        ("reward_margin", pa.float64()),
        ("reward_accuracy", pa.float64()),
        ("policy_chosen_logp", pa.float64()),
        ("policy_rejected_logp", pa.float64()),
        ("ref_chosen_logp", pa.float64()),
        ("ref_rejected_logp", pa.float64()),
        ("seconds", pa.float64()),  # wall time of the pass
    ]
)

# TRL's metric names -> the steps.parquet column that holds it (evals.parquet too, except grad_norm and lr), and
# its unit. The one mapping from our columns to TRL's names: the TensorBoard / W&B tags (dpo/dashboards.py:
# `train/<name>` per steps row, `eval/<name>` per eval pass, as transformers' callbacks name a DPOTrainer's logs)
# and the report's step curves (queries/report.py, panels in this order) both read it.
TRL_METRICS = [
    ("loss", "loss", "loss (nats)"),
    ("rewards/margins", "reward_margin", "β·nats"),
    ("rewards/accuracies", "reward_accuracy", "share of batch pairs"),
    ("rewards/chosen", "reward_chosen", "β·nats"),
    ("rewards/rejected", "reward_rejected", "β·nats"),
    ("grad_norm", "grad_norm", "L2 norm, before clipping"),
    ("logps/chosen", "policy_chosen_logp", "nats per completion"),
    ("logps/rejected", "policy_rejected_logp", "nats per completion"),
    ("learning_rate", "lr", "learning rate"),
]
