"""Numbers of the distributed engine (this rank's): stage times, every KV copy between the tiers, and one
record per stage switch.

A switch record (`SeesawStats.switches`) is written at each real switch, prefill -> decode or decode ->
prefill (the first stage of a run is a start, not a switch):

    from, to          the stage that ended and the one that starts
    seconds           the switch itself (re-shard weights + the collective that lines the ranks up)
    at_s              when it happened, seconds since the engine started
    weight_bytes      weight bytes copied by the switch: 0 on a CPU, where both topologies are views of the
                      node's master copy and nothing is copied
    kv_bytes          KV bytes the ended stage moved between the tiers, summed over the replica's ranks:
                      prefill: stashed device -> host store; decode: onboarded + prefetched host -> device,
                      plus swapped out device -> host
    kv_bytes_rank     the same, this rank only
    kv_copy_s         this rank's time in those copies (the stash and prefetch threads' time included)
    host_occupancy    host-store fill fraction once the new stage's first batch is scheduled
"""
from __future__ import annotations

from dataclasses import dataclass, field

from seesaw_ds.engine.llm_engine import EngineStats

COPY_KINDS = ("stash", "onboard", "prefetch", "swap_out")


@dataclass
class SeesawStats(EngineStats):
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
    device_blocks: int = 0          # the decode pool's capacity, and the most of it ever in use
    device_blocks_peak: int = 0
    switches: list[dict] = field(default_factory=list)
    host_occupancy: list[float] = field(default_factory=list)

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

    def summary(self) -> dict:
        return super().summary() | {"num_switches": len(self.switches)}
