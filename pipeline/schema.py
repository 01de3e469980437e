"""The stage-1 cache schema (../shared/design.md, "Stage 1 cache"). One row = one preference pair.

Stage 2 and stage 3 read these names; change them only together with the contract.
"""

import pyarrow as pa

SCHEMA_VERSION = 1

CACHE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),  # stable hash of (prompt, chosen, rejected) as given
        ("source_index", pa.int64()),  # row number in the input
        ("prompt_ids", pa.list_(pa.int32())),  # exact tokens scored
        ("chosen_ids", pa.list_(pa.int32())),  # completion tokens, EOS included
        ("rejected_ids", pa.list_(pa.int32())),
        ("ref_chosen_token_logps", pa.list_(pa.float32())),  # log p_ref per completion token
        ("ref_rejected_token_logps", pa.list_(pa.float32())),
        ("ref_chosen_logp", pa.float64()),  # sums of the above
        ("ref_rejected_logp", pa.float64()),
        ("prompt_len", pa.int32()),  # token counts after truncation
        ("chosen_len", pa.int32()),
        ("rejected_len", pa.int32()),
        ("shared_prefix_len", pa.int32()),  # leading completion tokens chosen and rejected share
        ("truncated", pa.bool_()),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        ("source_index", pa.int64()),
        ("source_file", pa.string()),
        ("reason", pa.string()),
    ]
)
