"""The result columns every run writes, in order, with their Arrow types.

Passthrough columns from the input come right after the id.
"""

from __future__ import annotations

import pyarrow as pa

RESULT_FIELDS: list[pa.Field] = [
    pa.field("output_text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("cached_prompt_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("error", pa.string()),
]

TOKEN_ID_FIELDS: list[pa.Field] = [
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("output_token_ids", pa.list_(pa.int32())),
]

RESERVED_NAMES = frozenset(f.name for f in RESULT_FIELDS + TOKEN_ID_FIELDS)
