"""The distributed Seesaw engine: every rank runs the same (pure) scheduler in lockstep; prefill runs under
the prefill layout, decode under the decode layout, and KV moves between them through the node's host
store. Sampling happens once, on the rank that holds the logits, and the tokens are broadcast.

    step: schedule -> [switch stage] -> (prefill: write host store | decode: onboard + read pool)
          -> sample on one rank -> broadcast -> postprocess
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from seesaw_ds.distributed.host_kv import HostKVStore
from seesaw_ds.distributed.stash import KVStasher
from seesaw_ds.engine.inputs import build_inputs
from seesaw_ds.engine.llm_engine import EngineStats, to_output
from seesaw_ds.engine.sampler import sample
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import ScheduledBatch
from seesaw_ds.engine.seesaw_scheduler import PREFILL, SeesawScheduler
from seesaw_ds.engine.sequence import RequestOutput, Sequence

log = logging.getLogger("seesaw_ds")


@dataclass
class SeesawStats(EngineStats):
    switch_s: float = 0.0
    onboard_s: float = 0.0          # synchronous host -> device copies (nothing to decode meanwhile)
    prefetch_stall_s: float = 0.0   # time decode waited for background copies to land
    prefetched_seqs: int = 0
    stash_s: float = 0.0            # prefill K/V writes into the host store (background when async)
    stash_wait_s: float = 0.0       # time prefill was held up by those writes (all of stash_s when sync)
    kv_bytes_moved: int = 0
    weight_bytes_moved: int = 0
    switches: list[dict] = field(default_factory=list)
    host_occupancy: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return super().summary() | {"num_switches": len(self.switches)}


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
        self.stats = SeesawStats()
        self._stage = None
        self._request_ids: set[str] = set()
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seesaw-prefetch")
        self._in_flight = None          # the future of the last prefetch

    # same surface as LLMEngine
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._request_ids:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.scheduler.add(Sequence(str(request_id), [int(t) for t in prompt_token_ids], params,
                                    self.eos_token_ids, self.scheduler.config.max_model_len))
        self._request_ids.add(str(request_id))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _switch(self, stage: str) -> None:
        t0 = time.perf_counter()
        # Weights: both topologies hold views of the node's master copy, so on a CPU nothing is copied;
        # on an accelerator this is where the new layout's shards are materialised on the device.
        dist.barrier()
        dt = time.perf_counter() - t0
        self.stats.switch_s += dt
        self.stats.switches.append({"to": stage, "seconds": dt, "weight_bytes": 0,
                                    "host_occupancy": self.scheduler.host_occupancy})
        if self.rank == 0:
            log.info("stage switch -> %s (%.3f s, host store %.0f%% full)", stage, dt,
                     100 * self.scheduler.host_occupancy)
        self._stage = stage

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        stage = self.scheduler.stage
        if stage != self._stage:
            self._switch(stage)
        t0 = time.perf_counter()
        bs = self.scheduler.config.block_size
        if batch.wait_prefetch:
            self._land_prefetch()
        if batch.is_prefill:
            ex, kv = self.prefill_executor, self.stasher
            self.store.layers, self.store.kv_heads = ex.layers, ex.kv_heads
        else:
            ex, kv = self.decode_executor, self.pool
            t1 = time.perf_counter()
            if batch.onboard:                                  # one gather/scatter for all newcomers
                host_blocks = [b for h, _ in batch.onboard for b in h]
                device_blocks = [b for _, d in batch.onboard for b in d]
                self.stats.kv_bytes_moved += self.store.load_into(self.pool, host_blocks, device_blocks)
            self.stats.onboard_s += time.perf_counter() - t1
            if batch.prefetch:                                 # lands while this step decodes
                host_blocks = [b for h, _ in batch.prefetch for b in h]
                device_blocks = [b for _, d in batch.prefetch for b in d]
                self.stats.prefetched_seqs += len(batch.prefetch)
                self._in_flight = self._prefetcher.submit(self.store.load_into, self.pool, host_blocks,
                                                          device_blocks)
        n_mb = self.micro_batches or getattr(ex, "max_micro_batches", 1)
        micro = [build_inputs(mb, bs, self.sliding_window) for mb in split_micro_batches(batch, n_mb)]
        logits = ex.run(micro, kv)
        if batch.is_prefill:
            self._flush_stash()
        tokens, logprobs = self._sample_and_share(logits, batch, ex.sampling_rank)
        finished = self.scheduler.postprocess(batch, tokens, logprobs)
        self._account(batch, time.perf_counter() - t0)
        for seq in finished:
            self._request_ids.discard(seq.request_id)
        return [self._output(s) for s in finished]

    def _flush_stash(self) -> None:
        # NOTE: every rank flushes its prefill writes here, before the stage-switch barrier that precedes
        # any decode onboarding, so no rank reads another rank's rectangle of the store mid-write.
        self.stasher.flush()
        self.stats.stash_s, self.stats.stash_wait_s = self.stasher.busy_s, self.stasher.wait_s

    def _land_prefetch(self) -> None:
        if self._in_flight is None:
            return
        t = time.perf_counter()
        self.stats.kv_bytes_moved += self._in_flight.result()
        self.stats.prefetch_stall_s += time.perf_counter() - t
        self._in_flight = None

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
