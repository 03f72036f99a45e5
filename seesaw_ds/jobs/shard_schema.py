"""Columns of an output shard: the fixed core columns, optional token ids and logprobs, carried input columns.

With `sampling.n` > 1 a shard has a `sample_index` column right after `id` (a row's samples 0..n-1 are n
rows); with n = 1 it has none, so a folder written before `sampling.n` existed keeps one schema when resumed.

A carried column whose type is not known yet (the source does not say, or its values are all None so far) is
written as all-null strings marked UNKNOWN_TYPE, never as Arrow's `null` type (a `null` column in one shard
would make the folder fail to load and every later shard fail to write); the first rows holding a value fix
its type.
"""
from __future__ import annotations

from typing import Any, Mapping

import pyarrow as pa

CORE_FIELDS = (
    pa.field("id", pa.string()), pa.field("row_index", pa.int64()),
    pa.field("prompt", pa.string()), pa.field("completion", pa.string()),
    pa.field("prompt_tokens", pa.int32()), pa.field("completion_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("temperature", pa.float64()), pa.field("top_k", pa.int32()), pa.field("top_p", pa.float64()),
    pa.field("max_tokens", pa.int32()), pa.field("seed", pa.int64()),
    pa.field("model", pa.string()), pa.field("layouts", pa.string()),
)
TOKEN_ID_FIELDS = (pa.field("prompt_token_ids", pa.list_(pa.int32())),
                   pa.field("completion_token_ids", pa.list_(pa.int32())))
# per output token: the chosen token and the top-N alternatives, as [{token_id, logprob}, ...]
LOGPROBS_FIELD = pa.field("logprobs", pa.list_(pa.list_(pa.struct([("token_id", pa.int32()),
                                                                   ("logprob", pa.float32())]))))
SAMPLE_INDEX_FIELD = pa.field("sample_index", pa.int32())      # which of the row's n samples (n > 1 only)
RESERVED_COLUMNS = frozenset(f.name for f in CORE_FIELDS + TOKEN_ID_FIELDS + (LOGPROBS_FIELD, SAMPLE_INDEX_FIELD))


# see the module docstring
UNKNOWN_TYPE = {b"seesaw.type": b"unknown"}


def _unknown(name: str) -> pa.Field:
    return pa.field(name, pa.string(), metadata=UNKNOWN_TYPE)


def is_unknown(field: pa.Field) -> bool:
    return field.type == pa.null() or (field.metadata or {}).get(b"seesaw.type") == b"unknown"


def output_schema(token_ids: bool, carry_types: Mapping[str, pa.DataType | None] = (),
                  logprobs: bool = False, sample_index: bool = False) -> pa.Schema:
    """The shard schema; a carried column of unknown type (None) gets its type from the first rows holding
    a value (see UNKNOWN_TYPE). `sample_index`: with sampling.n > 1 (see the module docstring)."""
    core = list(CORE_FIELDS[:1]) + ([SAMPLE_INDEX_FIELD] if sample_index else []) + list(CORE_FIELDS[1:])
    fields = core + (list(TOKEN_ID_FIELDS) if token_ids else []) + ([LOGPROBS_FIELD] if logprobs else [])
    return pa.schema(fields + [_unknown(name) if t is None or t == pa.null() else pa.field(name, t)
                               for name, t in dict(carry_types).items()])


def resolve_schema(schema: pa.Schema | None, rows: list[dict[str, Any]]) -> pa.Schema:
    """`schema` (inferred from `rows` when None) with each unknown-typed column typed by its values in `rows`
    (still unknown when they are all None)."""
    if schema is None:
        schema = pa.Table.from_pylist(rows).schema
    fields = []
    for field in schema:
        if is_unknown(field):
            found = pa.array([row.get(field.name) for row in rows]).type
            field = _unknown(field.name) if found == pa.null() else pa.field(field.name, found)
        fields.append(field)
    return pa.schema(fields)
