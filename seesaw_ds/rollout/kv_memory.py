"""Hand the rollout engine's KV memory back to the OS between rollouts, and take it again before the next.

Training and rollout share the ranks' memory: outside `RolloutEngine.generating()` the device KV pool is
an empty tensor (its allocation freed, then `malloc_trim`), decode's packed weight copies are dropped, and
the host store's shared-memory pages are punched out (`madvise(MADV_REMOVE)`: the mapping stays, the tmpfs
pages go; touched again they come back zero-filled). The engine's objects keep their identity, so nothing
inside the engine has to be rebuilt.
"""
from __future__ import annotations

import os

import torch

from seesaw_ds.distributed.builder import release_freed_host_memory
from seesaw_ds.kv.pool import madvise, zeros as pool_zeros

MADV_REMOVE = 9
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident memory (anonymous + file + shared pages), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _punch_out(tensor: torch.Tensor) -> bool:
    """Free the shared-memory pages under a file-mapped tensor; False if the OS refused."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return False
    start = tensor.data_ptr() - tensor.data_ptr() % PAGE
    length = (tensor.data_ptr() + nbytes - start) // PAGE * PAGE       # whole pages only
    return madvise(start, length, MADV_REMOVE)


class KVMemory:
    """The device pool and (layout pairs that switch) the host store of one engine."""

    def __init__(self, engine):
        self.pool = engine.runtimes["decode"].kv
        stasher = engine.runtimes["prefill"].stasher
        self.store = stasher.store if stasher is not None else None
        self.scheduler = engine.scheduler
        self.runners = list({id(r.executor.runner): r.executor.runner for r in engine.runtimes.values()}.values())
        self.held = True

    @property
    def pool_bytes(self) -> int:
        t = self.pool.tensor
        return t.numel() * t.element_size()

    def release(self) -> None:
        """Free the KV tiers; the engine must be idle (no request in flight)."""
        if not self.held:
            return
        if self.scheduler.has_unfinished():
            raise RuntimeError("cannot release KV memory with requests in flight")
        self.pool.tensor = torch.empty(0, dtype=self.pool.spec.dtype, device=self.pool.tensor.device)
        if self.store is not None:
            _punch_out(self.store.tensor)
        for runner in self.runners:      # decode's packed weight copies: made again on next use
            runner.release_derived()
        release_freed_host_memory()
        self.held = False

    def acquire(self) -> None:
        """Allocate the pool again and fault the host store's pages in (as at build time)."""
        if self.held:
            return
        from deepspeed.accelerator import get_accelerator
        device = get_accelerator().current_device_name() if self.pool.tensor.device.type != "cpu" else "cpu"
        self.pool.tensor = pool_zeros(self.pool.spec.shape, self.pool.spec.dtype, device)
        if self.store is not None:
            self.store.fault_in()
        self.held = True
