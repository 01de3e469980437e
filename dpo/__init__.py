"""Stage 2: train a policy with DPO and its relatives from a stage-1 cache (no reference model loaded)."""
