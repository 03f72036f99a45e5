"""Transition-minimising scheduling over a host KV tier. Pure bookkeeping: no tensors.

    WAITING --prefill--> STASHED (KV in the host store) --onboard--> RUNNING (device pool) --> FINISHED
       ^                        ^                                        |  |
       |                        +------ preempted: swapped out ----------+  |
       +--------------- preempted, the host store full: recompute ----------+

Stages switch rarely:
  * prefill: admit waiting prompts into the host store until it is full or no prompt remains;
  * decode: continuous batching; stashed sequences are onboarded as device blocks free up;
  * back to prefill once the next waiting prompt fits the store and either the store has drained to
    `threshold` x capacity with enough waiting to fill it again, or the decode batch starves (nothing
    left to onboard and room on the device). Recomputed leftovers thus ride along with a real refill
    instead of costing a round trip each.
Every step schedules at most `max_num_seqs` sequences and (one prefill prompt aside) at most
`max_num_batched_tokens` tokens (a prefill step: `SchedulerConfig.prefill_budget`, a pipeline's window). A request that could never fit either tier is rejected at admission, so
schedule() returns a batch whenever work remains.

A runner that must give up its device blocks during decode (the pool is full and others grow) is swapped
out when the host store can hold its cached KV (num_tokens - 1 tokens): `ScheduledBatch.swap_out` lists
(device blocks, host blocks) copies, the device blocks are freed at once, and the sequence goes back to the
FRONT of `stashed`, to be onboarded again like any stashed sequence. Only when the store cannot hold it is it
recomputed: its prompt and generated tokens are prefilled into the host store again.

NOTE: the engine executes a decode step's copies in this order, which is what makes reusing freed blocks in
the same step safe: wait for last step's prefetches (`wait_prefetch`) -> `swap_out` (device -> host) ->
`onboard` (host -> device) -> start `prefetch` (background) -> forward. Loads in flight (PREFETCHING) are not
in `running`, so they are never victims; their reserved device blocks and pinned host blocks stay allocated
until they land. No step both loads and preempts: loading keeps one free block for every runner about to
cross a block boundary (see _decode).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from seesaw_ds.engine.scheduler import RequestRejected, ScheduledBatch, Scheduler, SchedulerConfig  # noqa: F401
from seesaw_ds.engine.sequence import Sequence, SequenceStatus
from seesaw_ds.kv.allocator import BlockAllocator

PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class TierConfig:
    host_blocks: int
    device_blocks: int
    threshold: float = 0.25      # return to prefill when host occupancy <= threshold
    prefetch: bool = False       # onboard one step ahead (two-phase), overlapping the copy with decode
    swap_out: bool = True        # preempted runners go to the host store when it has room (else recompute)

    def __post_init__(self):
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"kv.threshold must be in [0, 1), got {self.threshold}")
        for name in ("host_blocks", "device_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"kv.{name} must hold at least one block, got {getattr(self, name)}")


class SeesawScheduler(Scheduler):
    has_host_tier = True

    def __init__(self, config: SchedulerConfig, tiers: TierConfig):
        super().__init__(config, tiers.device_blocks)
        self.tiers = tiers
        self.device = self.allocator            # the paged device pool
        self.host = BlockAllocator(tiers.host_blocks)
        self.stashed: deque[Sequence] = deque()
        self.prefetching: list[Sequence] = []   # device blocks reserved, host blocks pinned, copy in flight
        self.stage = PREFILL
        self.num_switches = 0          # prefill -> decode and decode -> prefill, each counted
        self.num_swap_outs = 0         # preemptions that moved the KV to the host store
        #                                (num_preemptions counts the recomputed ones)
        self._swap_outs: list[tuple[list[int], list[int]]] = []   # this step's, collected by _preempt

    def _blocks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.config.block_size)

    def add(self, seq: Sequence) -> None:
        self._admit(seq, (("host store", self.host.num_blocks), ("device pool", self.device.num_blocks)))
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.stashed or self.running or self.prefetching)

    @property
    def host_occupancy(self) -> float:
        return self.host.num_used / self.host.num_blocks

    @property
    def metrics(self) -> dict:
        return {"stage": self.stage, "host_occupancy": self.host_occupancy, "host_used": self.host.num_used,
                "device_used": self.device.num_used, "waiting": len(self.waiting),
                "stashed": len(self.stashed), "running": len(self.running),
                "num_switches": self.num_switches, "num_preemptions": self.num_preemptions,
                "num_swap_outs": self.num_swap_outs}

    def _max_batch_seqs(self) -> int:
        return min(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    def _next_prompt_fits_host(self) -> bool:
        return bool(self.waiting) and \
            self.host.can_allocate(self.waiting[0].blocks_needed(self.config.block_size))

    def _growth(self) -> int:
        """Device blocks the runners need this step: one for each crossing a block boundary."""
        return sum(len(s.block_table) < s.blocks_needed(self.config.block_size) for s in self.running)

    # ---- stage choice --------------------------------------------------------------------------------
    def _choose_stage(self) -> str:
        can_decode = bool(self.stashed or self.running or self.prefetching)
        if not can_decode:
            return PREFILL          # NOTE: both tiers are empty then, so the next prompt fits the store
        if self.stage == PREFILL:
            return PREFILL if self._next_prompt_fits_host() else DECODE
        if not self._next_prompt_fits_host():
            return DECODE
        if self.host_occupancy <= self.tiers.threshold and self._waiting_fills_host():
            return PREFILL          # refills the store from <= threshold up to its next misfit
        return PREFILL if self._decode_starves() else DECODE

    def _waiting_fills_host(self) -> bool:
        need, free = 0, self.host.num_free
        for seq in self.waiting:
            need += seq.blocks_needed(self.config.block_size)
            if need >= free:
                return True
        return False

    def _decode_starves(self) -> bool:
        """Nothing left to onboard and the decode batch has room: only a prefill can refill it."""
        head = self._blocks(self.waiting[0].num_tokens + 1) if self.waiting else 0
        return not self.stashed and len(self.running) < self._max_batch_seqs() and \
            self.device.can_allocate(head + self._growth())

    def schedule(self) -> ScheduledBatch | None:
        if not self.has_unfinished():
            return None
        landed = self._complete_prefetch()        # phase 2 for last step's loads (the engine waits on them)
        stage = self._choose_stage()
        if stage != self.stage:
            self.stage = stage
            self.num_switches += 1
        batch = self._prefill() if stage == PREFILL else self._decode()
        if batch is not None:
            batch.wait_prefetch = landed
        return batch

    # ---- two-phase onboarding: prepare (reserve device blocks, pin host blocks) -> complete ------------
    def _prepare_load(self, seq: Sequence, need: int) -> tuple[list[int], list[int]]:
        held = -(-(seq.num_tokens - 1) // self.config.block_size)      # blocks that hold stashed KV
        seq.block_table = self.device.allocate(need)
        return seq.host_blocks[:held], seq.block_table[:held]

    def _complete_load(self, seq: Sequence) -> None:
        self.host.free(seq.host_blocks)
        seq.host_blocks = []
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _complete_prefetch(self) -> bool:
        landed, self.prefetching = self.prefetching, []
        for seq in landed:
            if seq.finish_reason == "abort":      # aborted while its load was in flight: free it now
                seq.status = SequenceStatus.FINISHED
                self.host.free(seq.host_blocks)
                self.device.free(seq.block_table)
                seq.host_blocks, seq.block_table = [], []
            else:
                self._complete_load(seq)
        return bool(landed)

    def abort(self, seq: Sequence) -> bool:
        if seq in self.prefetching:               # NOTE: its copy is in flight; blocks go when it lands
            seq.finish_reason = "abort"
            return True
        if seq in self.stashed:
            self.stashed.remove(seq)
            seq.finish_reason = "abort"
            self._release(seq)
            return True
        return super().abort(seq)

    def _prefill(self) -> ScheduledBatch | None:
        cfg, picked, tokens = self.config, [], 0
        while self.waiting and len(picked) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if picked and tokens + seq.num_tokens > cfg.prefill_budget:
                break
            need = seq.blocks_needed(cfg.block_size)
            if not self.host.can_allocate(need):
                break
            self.waiting.popleft()
            seq.host_blocks = self.host.allocate(need)
            seq.status = SequenceStatus.STASHED
            picked.append(seq)
            tokens += seq.num_tokens
        return ScheduledBatch(True, picked, to_host=True) if picked else None

    def _decode(self) -> ScheduledBatch | None:
        onboard = []
        # NOTE: keep one block for every runner about to cross a block boundary, so onboarding never
        # forces a preemption in the same step (that would discard the stashed KV it just read).
        growth = self._growth()
        loads: list[Sequence] = []
        while self.stashed and len(self.running) + len(loads) < self._max_batch_seqs():
            seq = self.stashed[0]
            # room for the KV it holds plus the token it will feed next
            need = self._blocks(seq.num_tokens)
            if not self.device.can_allocate(need + growth):
                break
            self.stashed.popleft()
            onboard.append(self._prepare_load(seq, need))
            loads.append(seq)
        prefetch: list[tuple[list[int], list[int]]] = []
        if self.tiers.prefetch and self.running:   # decode goes on while these land (next step)
            for seq in loads:
                seq.status = SequenceStatus.PREFETCHING
            self.prefetching, prefetch, onboard = loads, onboard, []
        else:                                     # nothing to decode meanwhile: load now
            for seq in loads:
                self._complete_load(seq)
        self._swap_outs = []
        scheduled = self._grow_running()          # may preempt: swap-outs land in self._swap_outs
        swap_out, self._swap_outs = self._swap_outs, []
        if not scheduled:
            # NOTE: cannot happen after a preemption: the last runner alone always fits (admission)
            if swap_out:
                raise RuntimeError("internal: swap-outs scheduled in a step with nothing to decode")
            return None
        return ScheduledBatch(False, scheduled, onboard=onboard, prefetch=prefetch, swap_out=swap_out)

    # ---- preemption: swap out to the host store, or recompute ------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        held = self._blocks(seq.num_tokens - 1)          # blocks holding its cached KV
        if not (self.tiers.swap_out and self.host.can_allocate(held)):
            super()._preempt(seq)                        # recompute: back to waiting, KV discarded
            return
        host_blocks = self.host.allocate(held)
        self._swap_outs.append((seq.block_table[:held], host_blocks))
        self.device.free(seq.block_table)                # reusable this step: the copy runs first
        seq.block_table, seq.host_blocks = [], host_blocks
        seq.status = SequenceStatus.STASHED
        self.running.remove(seq)
        self.stashed.appendleft(seq)                     # resumed first
        self.num_swap_outs += 1

    # ---- results -------------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        if seq.host_blocks:
            self.host.free(seq.host_blocks)
        seq.host_blocks = []
        super()._release(seq)

    def _keep(self, batch: ScheduledBatch, seq: Sequence) -> None:
        if batch.is_prefill:                      # its KV now waits in the host store
            self.stashed.append(seq)
