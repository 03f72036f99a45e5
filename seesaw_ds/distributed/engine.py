"""The distributed Seesaw engine: every rank runs the same (pure) scheduler in lockstep; prefill runs under
the prefill layout, decode under the decode layout, and KV moves between them through the node's host
store. Sampling happens once, on the rank that holds the logits, and the tokens are broadcast.

    step: schedule -> [land last step's prefetch] -> [switch stage] -> (prefill: write host store |
          decode: swap out, onboard, start prefetch (kv_moves.py), read pool) -> sample on one rank
          -> broadcast -> postprocess
"""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from seesaw_ds.distributed.host_kv import HostKVStore
from seesaw_ds.distributed.kv_moves import TierCopies
from seesaw_ds.distributed.stash import KVStasher
from seesaw_ds.distributed.stats import SeesawStats
from seesaw_ds.engine.inputs import build_inputs
from seesaw_ds.engine.llm_engine import to_output
from seesaw_ds.engine.sampler import sample
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import ScheduledBatch
from seesaw_ds.engine.seesaw_scheduler import PREFILL, SeesawScheduler
from seesaw_ds.engine.sequence import RequestOutput, Sequence

log = logging.getLogger("seesaw_ds")


def split_micro_batches(batch: ScheduledBatch, n: int) -> list[ScheduledBatch]:
    """Up to n micro-batches of consecutive sequences with balanced token counts."""
    n = max(1, min(n, len(batch.seqs)))
    total = sum(s.num_tokens if batch.is_prefill else 1 for s in batch.seqs)
    out, cur, acc = [], [], 0
    for i, s in enumerate(batch.seqs):
        cur.append(s)
        acc += s.num_tokens if batch.is_prefill else 1
        left_seqs, left_mbs = len(batch.seqs) - i - 1, n - len(out) - 1
        if left_mbs > 0 and (acc >= total * (len(out) + 1) / n or left_seqs == left_mbs):
            out.append(ScheduledBatch(batch.is_prefill, cur, batch.to_host))
            cur = []
    if cur:
        out.append(ScheduledBatch(batch.is_prefill, cur, batch.to_host))
    return out


class DistributedEngine:
    def __init__(self, scheduler: SeesawScheduler, prefill_executor, decode_executor, store: HostKVStore,
                 pool, eos_token_ids=(), detokenize=None, sliding_window=None, micro_batches: int = 0,
                 stash_async: bool = True):
        self.scheduler = scheduler
        self.prefill_executor, self.decode_executor = prefill_executor, decode_executor
        self.store, self.pool = store, pool
        self.stasher = KVStasher(store, asynchronous=stash_async)     # the prefill KV target
        self.eos_token_ids = tuple(eos_token_ids)
        self.detokenize = detokenize
        self.sliding_window = sliding_window
        self.micro_batches = micro_batches
        self.rank = dist.get_rank()
        self.stats = SeesawStats(device_blocks=scheduler.device.num_blocks)
        self.copies = TierCopies(store, pool, self.stats)             # decode's host <-> device copies
        self._stage = None
        self._t_start = time.perf_counter()
        self._stage_mark = (0, 0.0)     # (kv bytes, copy seconds) at the start of the current stage
        self._request_ids: set[str] = set()

    # same surface as LLMEngine
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._request_ids:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.scheduler.add(Sequence(str(request_id), [int(t) for t in prompt_token_ids], params,
                                    self.eos_token_ids, self.scheduler.config.max_model_len))
        self._request_ids.add(str(request_id))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _switch(self, stage: str) -> float:
        """Enter `stage`; record a switch unless this is the run's first stage. Returns its seconds."""
        previous, self._stage = self._stage, stage
        moved, copy_s = self.stats.kv_copy_totals()
        rank_bytes, rank_copy_s = moved - self._stage_mark[0], copy_s - self._stage_mark[1]
        self._stage_mark = (moved, copy_s)
        if previous is None:            # the first stage is a start, not a switch
            return 0.0
        t0 = time.perf_counter()
        # Weights: both topologies hold views of the node's master copy, so on a CPU nothing is copied
        # (weight_bytes 0); on an accelerator this is where the new layout's shards would be materialised.
        # NOTE: the all-reduce is also the barrier: every rank has flushed its prefill writes (end of each
        # prefill step) before any rank onboards from the store.
        kv_bytes = torch.tensor([rank_bytes], dtype=torch.long)
        dist.all_reduce(kv_bytes)
        dt = time.perf_counter() - t0
        self.stats.switch_s += dt
        self.stats.switches.append({
            "from": previous, "to": stage, "seconds": dt, "at_s": time.perf_counter() - self._t_start,
            "weight_bytes": 0, "kv_bytes": int(kv_bytes), "kv_bytes_rank": rank_bytes,
            "kv_copy_s": rank_copy_s, "host_occupancy": self.scheduler.host_occupancy})
        if self.rank == 0:
            log.info("stage switch %s -> %s (%.3f s; the %s stage moved %.1f MB of KV; host store %.0f%% full)",
                     previous, stage, dt, previous, int(kv_bytes) / 1e6, 100 * self.scheduler.host_occupancy)
        return dt

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        t0 = time.perf_counter()
        if batch.wait_prefetch:         # before a switch: those copies belong to the decode stage
            self.copies.land()
        switch_s = self._switch(self.scheduler.stage) if self.scheduler.stage != self._stage else 0.0
        self.stats.device_blocks_peak = max(self.stats.device_blocks_peak, self.scheduler.device.num_used)
        bs = self.scheduler.config.block_size
        if batch.is_prefill:
            ex, kv = self.prefill_executor, self.stasher
            self.store.layers, self.store.kv_heads = ex.layers, ex.kv_heads
        else:
            ex, kv = self.decode_executor, self.pool
            self.copies.run(batch)      # swap-outs, then onboarding, then this step's prefetch
        n_mb = self.micro_batches or ex.micro_batches(batch.is_prefill)
        micro = [build_inputs(mb, bs, self.sliding_window) for mb in split_micro_batches(batch, n_mb)]
        logits = ex.run(micro, kv)
        if batch.is_prefill:
            self._flush_stash()
        tokens, logprobs = self._sample_and_share(logits, batch, ex.sampling_rank)
        finished = self.scheduler.postprocess(batch, tokens, logprobs)
        self._account(batch, time.perf_counter() - t0 - switch_s)
        for seq in finished:
            self._request_ids.discard(seq.request_id)
        return [self._output(s) for s in finished]

    def _flush_stash(self) -> None:
        # NOTE: every rank flushes its prefill writes here, before the stage-switch collective that
        # precedes any decode onboarding, so no rank reads another rank's rectangle of the store mid-write.
        st = self.stasher
        st.flush()
        self.stats.add_copy("stash", st.bytes - self.stats.stash_bytes, st.busy_s - self.stats.stash_s)
        self.stats.stash_wait_s = st.wait_s

    def _sample_and_share(self, logits, batch: ScheduledBatch, src: int):
        tokens = torch.zeros(len(batch.seqs), dtype=torch.long)
        logprobs = None
        if self.rank == src:
            ids, logprobs = sample(logits, batch.seqs)
            tokens = torch.tensor(ids, dtype=torch.long)
        dist.broadcast(tokens, src=src)
        if any(s.params.logprobs is not None for s in batch.seqs):
            box = [logprobs]
            dist.broadcast_object_list(box, src=src)
            logprobs = box[0]
        return tokens.tolist(), logprobs

    def _account(self, batch: ScheduledBatch, seconds: float) -> None:
        self.stats.account(batch, seconds)
        self.stats.host_occupancy.append(self.scheduler.host_occupancy)

    def _output(self, seq: Sequence) -> RequestOutput:
        return to_output(seq, self.detokenize if self.rank == 0 else None)


__all__ = ["DistributedEngine", "SeesawStats", "split_micro_batches", "PREFILL"]
