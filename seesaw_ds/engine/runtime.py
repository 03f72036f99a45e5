"""A stage's runtime on this rank: how prefill (or decode) runs here, built once from the re-shard plans.

    StageRuntime
      layout        the stage's parallel layout (tp x pp x dp)
      rect          this rank's KV rectangle under it: layers x KV heads (kv_plan.kv_ownership)
      executor      runs micro-batches: local, AutoTP, or DeepSpeed's pipeline engine
      kv            where the attention hook writes new K/V: the paged device pool, or (prefill of a layout
                    pair that switches) the stasher into the node's host store
      copies        decode of a pair that switches: swap-outs, onboarding and prefetch between the host store
                    and the pool, as the plan's moves into / out of `rect`

    step:  prepare(batch) -> forward(batch) -> finish()

A static layout is one runtime serving both stages (the pool is its only KV tier); a layout pair has one
runtime per stage, and the engine records a switch whenever the runtime changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Protocol

import torch

from seesaw_ds.engine.inputs import ModelInputs, build_inputs, micro_batch_groups
from seesaw_ds.engine.scheduler import ScheduledBatch
from seesaw_ds.engine.stats import EngineStats
from seesaw_ds.models.vocab_head import ShardedLogits
from seesaw_ds.parallel.kv_plan import KVRect
from seesaw_ds.parallel.layout import Layout


class StageExecutor(Protocol):
    layers: range      # global decoder layers this rank computes
    kv_heads: range    # global KV heads this rank holds

    def micro_batches(self, is_prefill: bool, tokens: int) -> int: ...

    def run(self, micro_inputs: list[ModelInputs], kv: Any) -> torch.Tensor | None: ...


@dataclasses.dataclass(eq=False)
class StageRuntime:
    name: str                      # "prefill", "decode", or "static" (one runtime for both)
    layout: Layout
    rect: KVRect
    executor: StageExecutor
    kv: Any
    sampling_rank: int             # the rank (of the engine's communicator) that holds the logits
    copies: Any = None             # TierCopies: decode of a pair that switches
    stasher: Any = None            # KVStasher: prefill of a pair that switches
    micro_batches: int = 0         # 0: the executor's own choice
    collectives: Callable[[], ContextManager] = contextlib.nullcontext   # around forward and sampling

    def __post_init__(self):
        got = (self.executor.layers, self.executor.kv_heads)
        if got != (self.rect.layers, self.rect.heads):
            raise RuntimeError(f"{self.name} executor holds layers {got[0]} x KV heads {got[1]}; the re-shard "
                               f"plan gives this rank {self.rect.layers} x {self.rect.heads}")

    def prepare(self, batch: ScheduledBatch) -> None:
        """Before the forward: decode's tier copies (swap out, onboard, start the next prefetch)."""
        if self.copies is not None:
            self.copies.run(batch)

    def forward(self, batch: ScheduledBatch, block_size: int, sliding_window: int | None) -> torch.Tensor | None:
        """The batch's last-token logits [B, V] float32 on the sampling rank (None elsewhere under PP)."""
        tokens = sum(s.num_tokens for s in batch.seqs) if batch.is_prefill else len(batch.seqs)
        n = self.micro_batches or self.executor.micro_batches(batch.is_prefill, tokens)
        groups = micro_batch_groups(batch, n)
        micro = [build_inputs(ScheduledBatch(batch.is_prefill, [batch.seqs[i] for i in g], batch.to_host),
                              block_size, sliding_window) for g in groups]
        logits = self.executor.run(micro, self.kv)                     # rows in micro-batch order
        order = [i for g in groups for i in g]
        if logits is None or order == list(range(len(order))):
            return logits
        rows = torch.empty(len(order), dtype=torch.long)
        rows[order] = torch.arange(len(order))                          # sequence i's row
        if isinstance(logits, ShardedLogits):
            return logits.rows(rows.to(logits.local.device))
        return logits[rows.to(logits.device)]

    def finish(self, stats: EngineStats) -> None:
        """After the forward: every prefill write has landed in the host store (before any rank reads it)."""
        if self.stasher is None:
            return
        st = self.stasher
        st.flush()
        stats.add_copy("stash", st.bytes - stats.stash_bytes, st.busy_s - stats.stash_s)
        stats.stash_wait_s = st.wait_s

    def land(self) -> None:
        """Wait for the last step's prefetch (decode of a pair that switches)."""
        if self.copies is not None:
            self.copies.land()

    def close(self) -> None:
        """Join this runtime's threads (idempotent)."""
        if self.copies is not None:
            self.copies.close()
        if self.stasher is not None:
            self.stasher.close()
