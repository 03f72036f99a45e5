"""Asynchronous stash: prefill K/V leave the compute thread while the next layers and micro-batches run.

    attention hook --write(layer, k, v, slots)--> KVStasher --queue--> stash thread --> HostKVStore.write
                                                      |                 (head-major index_copy_)
                         accelerator only: device -> pinned staging copy, non_blocking, on a side stream

`KVStasher` is the prefill runtime's KV target in place of the host store itself: it writes this rank's
KV heads (its rectangle's head range) of the layers the attention hook hands it. `write()` hands the tensors to ONE background thread and returns; the thread does the same
head-major `index_copy_` as a synchronous write (torch releases the GIL inside it, so on a CPU it runs on
another core while the caller computes). `flush()` waits for every pending write and raises, as a
`StashError`, the first error the thread met. With `asynchronous=False` the same writes run inline.

NOTE: a tensor handed to write() must not be mutated afterwards: the attention hook's K/V are fresh tensors
(the RoPE output and the v projection), and the slot mapping is built once per micro-batch.
NOTE: rows written by write() may be read only after flush() returned: the engine flushes at the end of
every prefill step, before sampling, so each rank has flushed before the stage-switch barrier that
precedes any decode onboarding from the store.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import torch

from seesaw_ds.distributed.host_kv import HostKVStore


class StashError(RuntimeError):
    """A background write into the host store failed; the original error is the `__cause__`."""


@dataclass(frozen=True, eq=False)
class PendingWrite:
    """One layer's new K/V on its way into the host store."""
    layer: int
    kv_heads: range              # the store heads these rows belong to (captured at write time)
    key: torch.Tensor            # [1, Hkv_r, T, D]; host memory once `landed` has fired
    value: torch.Tensor          # [1, Hkv_r, T, D]
    slots: torch.Tensor          # [T] long: host-store token slots
    landed: object = None        # accelerator event recorded after the device -> host copies; None on a CPU
    keep_alive: tuple = ()       # device tensors an in-flight copy still reads
    staging: tuple = ()          # pinned buffers to give back once written

    def __post_init__(self):
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.key.dim() != 4 or self.key.shape[0] != 1:
            raise ValueError(f"key must be [1, Hkv, T, D], got {tuple(self.key.shape)}")
        if self.value.shape != self.key.shape:
            raise ValueError(f"value {tuple(self.value.shape)} must match key {tuple(self.key.shape)}")
        if self.key.shape[1] != len(self.kv_heads):
            raise ValueError(f"key has {self.key.shape[1]} KV heads but kv_heads is {self.kv_heads}")
        if self.slots.dim() != 1 or self.slots.numel() != self.key.shape[2]:
            raise ValueError(f"slots must be [T={self.key.shape[2]}], got {tuple(self.slots.shape)}")


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class PinnedStaging:
    """Reusable page-locked host buffers for device -> host copies (flat, power-of-two sizes)."""

    def __init__(self, accelerator):
        self._accelerator = accelerator
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.dtype == dtype and b.numel() >= numel]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return self._accelerator.pin_memory(torch.empty(_next_pow2(numel), dtype=dtype))

    def give_back(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)


_STOP = object()


class KVStasher:
    """The prefill KV target: `write(layer, key, value, slots)` now, `flush()` before anything reads."""

    def __init__(self, store: HostKVStore, kv_heads: range, asynchronous: bool = True, max_pending: int = 64):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.store = store
        self.kv_heads = kv_heads     # global KV heads of the rows this rank writes
        self.asynchronous = asynchronous
        self.busy_s = 0.0        # time spent writing into the store (stash thread, or inline)
        self.busy_cpu_s = 0.0    # the writing thread's CPU time in those writes (busy_s minus time off the CPU)
        self.calls = 0           # write() calls: one per layer and micro-batch
        self._itemsize = store.tensor.element_size()
        self.wait_s = 0.0        # time the caller was held up: inline writes, a full queue, flush()
        self.bytes = 0           # K/V bytes handed to the store (counted at write(), in the caller)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._accelerator = None
        self._side_stream = None
        self._staging: PinnedStaging | None = None

    # ---- the attention hook's sink -------------------------------------------------------------------
    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """key/value: [1, Hkv_r, T, D] for this rank's KV heads (`self.kv_heads`); slots: [T]."""
        heads = self.kv_heads
        self.bytes += 2 * key.numel() * self._itemsize
        self.calls += 1
        if not self.asynchronous:         # straight into the store: no record, no queue
            if key.shape != value.shape or key.dim() != 4 or key.shape[1] != len(heads) or \
                    slots.shape != key.shape[2:3]:
                PendingWrite(layer, heads, key, value, slots)    # raises the ValueError that names the field
            t0, c0 = time.perf_counter(), time.thread_time()
            with torch.no_grad():
                self.store.write(layer, key, value, slots, heads)
            dt = time.perf_counter() - t0
            self.busy_s += dt
            self.busy_cpu_s += time.thread_time() - c0
            self.wait_s += dt
            return
        if key.device.type == "cpu":
            item = PendingWrite(layer, heads, key, value, slots)
        else:
            item = self._stage_to_host(layer, heads, key, value, slots)
        self._start_thread()
        t0 = time.perf_counter()
        self._queue.put(item)             # blocks while max_pending writes are queued: back-pressure
        self.wait_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every write so far is in the store; raise the first background error, if any."""
        if self._thread is not None:
            t0 = time.perf_counter()
            self._queue.join()
            self.wait_s += time.perf_counter() - t0
        if self._error is not None:
            err, self._error = self._error, None
            raise StashError(f"a background K/V write into the host store failed: {err!r}") from err

    def close(self) -> None:
        """Flush, then stop the stash thread (a later write starts a new one)."""
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join()
                self._thread = None

    # ---- internals -----------------------------------------------------------------------------------
    def _start_thread(self) -> None:
        # started lazily, so a stasher built before a fork still gets its thread in the child
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="seesaw-stash", daemon=True)
            self._thread.start()

    def _write(self, item: PendingWrite) -> None:
        if item.landed is not None:
            item.landed.synchronize()     # the device -> host copies have landed in the staging buffers
        with torch.no_grad():
            self.store.write(item.layer, item.key, item.value, item.slots, item.kv_heads)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._queue.task_done()
                return
            try:
                if self._error is None:   # after a failure the store is suspect: drop the rest, flush raises
                    t0, c0 = time.perf_counter(), time.thread_time()
                    self._write(item)
                    self.busy_s += time.perf_counter() - t0
                    self.busy_cpu_s += time.thread_time() - c0
            except Exception as err:      # noqa: BLE001 - handed to the caller by flush()
                self._error = err
            finally:
                for buffer in item.staging:
                    self._staging.give_back(buffer)
                del item                  # drop the tensors now, not at the next get()
                self._queue.task_done()

    def _stage_to_host(self, layer: int, heads: range, key: torch.Tensor, value: torch.Tensor,
                       slots: torch.Tensor) -> PendingWrite:
        """Accelerator: start device -> pinned host copies on a side stream; the stash thread waits on
        the recorded event before writing. The device tensors stay referenced until then."""
        if self._accelerator is None:
            from deepspeed.accelerator import get_accelerator
            self._accelerator = get_accelerator()
            self._side_stream = self._accelerator.Stream()
            self._staging = PinnedStaging(self._accelerator)
        acc = self._accelerator
        self._side_stream.wait_stream(acc.current_stream())   # copy only what the compute stream produced
        staged, buffers = [], []
        with acc.stream(self._side_stream):
            for t in (key, value, slots):
                if t.device.type == "cpu":
                    staged.append(t)
                    continue
                buffer = self._staging.take(t.numel(), t.dtype)
                host = buffer[:t.numel()].view(t.shape)
                host.copy_(t, non_blocking=True)
                staged.append(host)
                buffers.append(buffer)
            landed = acc.Event()
            landed.record(self._side_stream)
        return PendingWrite(layer, heads, *staged, landed=landed, keep_alive=(key, value, slots),
                            staging=tuple(buffers))
