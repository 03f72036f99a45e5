"""Execution of a decode step's KV copies between the host store and this rank's device pool, in the one
order the scheduler's bookkeeping relies on, each copy timed (the prefetch thread's too) into EngineStats.

    land()     wait for last step's prefetch     (its device blocks reserved, host blocks pinned until now)
    run(batch):
      swap_out   device -> host, synchronous     (the victims' device blocks may be reused below)
      onboard    host -> device, synchronous
      prefetch   host -> device, background      (lands by the next step's land())
    then the engine runs the forward.

Each rank copies only its own rectangle (layers x KV heads), as the moves of the KV re-shard plan into it
(loads: from the prefill layout's rectangles) and out of it (swap-outs: back into them), and reads back only
what was written before the stage switch or by itself, so decode copies need no cross-rank synchronisation.
What to copy is decided by the (pure) scheduler; which rectangles, by the plan.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from seesaw_ds.distributed.host_kv import HostKVStore
from seesaw_ds.engine.stats import EngineStats
from seesaw_ds.parallel.kv_plan import KVMove
from seesaw_ds.engine.scheduler import ScheduledBatch


def _flatten(pairs: list[tuple[list[int], list[int]]]) -> tuple[list[int], list[int]]:
    return [b for a, _ in pairs for b in a], [b for _, c in pairs for b in c]


class TierCopies:
    def __init__(self, store: HostKVStore, pool, stats: EngineStats, loads: tuple[KVMove, ...],
                 saves: tuple[KVMove, ...]):
        self.store, self.pool, self.stats = store, pool, stats
        self.loads, self.saves = loads, saves        # plan moves into / out of this rank's rectangle
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seesaw-prefetch")
        self._in_flight: Future | None = None     # -> (bytes, seconds, CPU seconds) of the last prefetch
        # per copy kind: [calls, seconds, the copying thread's CPU seconds] (seconds minus CPU: time the
        # copying thread was off the CPU: preempted, or waiting for the GIL)
        self.profile = {kind: [0, 0.0, 0.0] for kind in ("onboard", "prefetch", "swap_out")}

    def _count(self, kind: str, nbytes: int, seconds: float, cpu_s: float) -> None:
        self.stats.add_copy(kind, nbytes, seconds)
        entry = self.profile[kind]
        entry[0] += 1
        entry[1] += seconds
        entry[2] += cpu_s

    def _timed(self, kind: str, fn, *args) -> None:
        t, c = time.perf_counter(), time.thread_time()
        nbytes = fn(*args)
        self._count(kind, nbytes, time.perf_counter() - t, time.thread_time() - c)

    def land(self) -> None:
        """Block until last step's prefetch has landed; count its bytes and the thread's copy time."""
        if self._in_flight is None:
            return
        t = time.perf_counter()
        nbytes, seconds, cpu_s = self._in_flight.result()
        self.stats.prefetch_stall_s += time.perf_counter() - t
        self._count("prefetch", nbytes, seconds, cpu_s)
        self._in_flight = None

    def run(self, batch: ScheduledBatch) -> None:
        if self._in_flight is not None:
            raise RuntimeError("a prefetch is still in flight: land() it before the next step's copies")
        if batch.swap_out:                    # one gather/scatter for every victim
            device_blocks, host_blocks = _flatten(batch.swap_out)
            self._timed("swap_out", self.store.save_from, self.pool, self.saves, device_blocks, host_blocks)
            self.stats.swapped_out_seqs += len(batch.swap_out)
        if batch.onboard:                     # one gather/scatter for all newcomers
            host_blocks, device_blocks = _flatten(batch.onboard)
            self._timed("onboard", self.store.load_into, self.pool, self.loads, host_blocks, device_blocks)
        if batch.prefetch:                    # lands while this step decodes
            host_blocks, device_blocks = _flatten(batch.prefetch)
            self.stats.prefetched_seqs += len(batch.prefetch)
            self._in_flight = self._thread.submit(self._background_load, host_blocks, device_blocks)

    def _background_load(self, host_blocks: list[int], device_blocks: list[int]) -> tuple[int, float, float]:
        t, c = time.perf_counter(), time.thread_time()
        nbytes = self.store.load_into(self.pool, self.loads, host_blocks, device_blocks)
        return nbytes, time.perf_counter() - t, time.thread_time() - c

    def close(self) -> None:
        """Land what is in flight, then join the prefetch thread (idempotent)."""
        try:
            self.land()
        finally:
            self._thread.shutdown(wait=True)
