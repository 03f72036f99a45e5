"""How a pipelined prefill step is cut into micro-batches. Pure arithmetic, shared by the engine's pipeline
executor and the planner's cost model, so the two count the same passes.

A pass of m micro-batches over pp stages takes (m + pp - 1) micro-batch times, and every micro-batch pays
each stage's fixed costs again (its weights re-read, each layer's dispatch, the sends between stages). Many
micro-batches shrink the fill-and-drain bubble; small ones run their matmuls at a fraction of the rate of
large ones. So a prefill step of `tokens` prompt tokens is cut into about one micro-batch per
`PREFILL_MIN_MICRO_TOKENS`, at most `PREFILL_WINDOW`; a full window (`prefill_window_tokens`) holds
`PREFILL_WINDOW` micro-batches of `PREFILL_MICRO_TOKENS`.
"""
from __future__ import annotations

PREFILL_MICRO_TOKENS = 2048       # a prefill micro-batch's size in a full window (tokens)
PREFILL_MIN_MICRO_TOKENS = 1024   # tokens per micro-batch below which a step is cut into fewer of them
PREFILL_WINDOW = 16               # most prefill micro-batches per pipeline pass (the bubble: (pp - 1) / 16)
DECODE_MICRO_BATCHES = 1


def prefill_window_tokens(pp: int) -> int:
    """Prompt tokens a prefill step of a `pp`-stage pipeline admits (0: no pipeline, the step budget rules)."""
    return PREFILL_WINDOW * PREFILL_MICRO_TOKENS if pp > 1 else 0


def prefill_micro_batch_count(tokens: float, most: int = PREFILL_WINDOW) -> int:
    """Micro-batches for a pipelined prefill step of `tokens` prompt tokens: one per
    `PREFILL_MIN_MICRO_TOKENS` (rounded), at least 1, at most `most`."""
    if most < 1:
        raise ValueError(f"most must be >= 1, got {most}")
    return max(1, min(most, round(tokens / PREFILL_MIN_MICRO_TOKENS)))
