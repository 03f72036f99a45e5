"""The engine's numbers (this rank's), in one typed record that jobs, tracking and benchmarks read.

    stage             what the last step ran: "prefill", "decode", or None before the first step
    switches          one record per real stage switch (a runtime change: prefill -> decode or back; the first
                      stage of a run is a start, not a switch); static layouts never switch

A switch record:

    from, to          the stage that ended and the one that starts
    seconds           the switch itself (re-shard weights + the collective that lines the ranks up)
    at_s              when it happened, seconds since the engine started
    weight_bytes      weight bytes copied by the switch: 0 where both topologies are views of the master copy
    kv_bytes          KV bytes the ended stage moved between the tiers, summed over the replica's ranks:
                      prefill: stashed into the host store; decode: onboarded + prefetched into the pool,
                      plus swapped out
    kv_bytes_rank     the same, this rank only
    kv_copy_s         this rank's time in those copies (the stash and prefetch threads' time included)
    host_occupancy    host-store fill fraction once the new stage's first batch is scheduled
"""
from __future__ import annotations

from dataclasses import dataclass, field

COPY_KINDS = ("stash", "onboard", "prefetch", "swap_out")


@dataclass
class EngineStats:
    stage: str | None = None
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0
    prefill_tokens_done: int = 0    # prompt tokens through this rank's prefill stage, advanced during a step
    #                                 by executors that report per micro-batch (a pipelined pass), else per step
    decode_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    switch_s: float = 0.0
    # KV copies between the tiers, per kind: seconds spent copying and bytes (this rank's rectangle)
    stash_s: float = 0.0            # prefill K/V writes into the host store (background when async)
    stash_wait_s: float = 0.0       # time prefill was held up by those writes (all of stash_s when sync)
    stash_bytes: int = 0
    onboard_s: float = 0.0          # synchronous host -> device copies (nothing to decode meanwhile)
    onboard_bytes: int = 0
    prefetch_s: float = 0.0         # background host -> device copies (the prefetch thread's time)
    prefetch_bytes: int = 0
    prefetch_stall_s: float = 0.0   # time decode waited for background copies to land
    prefetched_seqs: int = 0
    swap_out_s: float = 0.0         # device -> host copies of preempted runners (before the step's forward)
    swap_out_bytes: int = 0
    swapped_out_seqs: int = 0
    kv_bytes_moved: int = 0         # all of the above kinds
    weight_bytes_moved: int = 0
    weight_updates: int = 0         # update_weights calls, and the bytes they wrote
    weight_update_bytes: int = 0
    weight_update_s: float = 0.0
    device_blocks: int = 0          # the decode pool's capacity, and the most of it ever in use
    device_blocks_peak: int = 0
    decode_batch_sizes: list[int] = field(default_factory=list)   # per step (in-flight decode: per micro-batch)
    switches: list[dict] = field(default_factory=list)
    host_occupancy: list[float] = field(default_factory=list)

    def account(self, is_prefill: bool, num_seqs: int, num_tokens: int, seconds: float) -> None:
        self.stage = "prefill" if is_prefill else "decode"
        if is_prefill:
            self.prefill_steps += 1
            self.prefill_tokens += num_tokens
            self.prefill_tokens_done = self.prefill_tokens
            self.prefill_s += seconds
        else:
            self.decode_steps += 1
            self.decode_tokens += num_tokens
            self.decode_s += seconds
            self.decode_batch_sizes.append(num_seqs)

    def add_copy(self, kind: str, nbytes: int, seconds: float) -> None:
        if kind not in COPY_KINDS:
            raise ValueError(f"unknown KV copy kind {kind!r}; expected one of {COPY_KINDS}")
        setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)
        setattr(self, f"{kind}_s", getattr(self, f"{kind}_s") + seconds)
        self.kv_bytes_moved += nbytes

    def kv_copy_totals(self) -> tuple[int, float]:
        """(bytes, seconds) over every copy kind so far."""
        return (sum(getattr(self, f"{k}_bytes") for k in COPY_KINDS),
                sum(getattr(self, f"{k}_s") for k in COPY_KINDS))

    @property
    def num_switches(self) -> int:
        return len(self.switches)

    @property
    def mean_decode_batch(self) -> float:
        sizes = self.decode_batch_sizes
        return sum(sizes) / len(sizes) if sizes else 0.0

    def summary(self) -> dict:
        """Every scalar, plus the switch count and the mean decode batch (the stage as a string)."""
        return {k: v for k, v in vars(self).items() if not isinstance(v, list)} | {
            "num_switches": self.num_switches, "mean_decode_batch": self.mean_decode_batch}
