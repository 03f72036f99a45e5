"""The node's host KV store: one shared, head-major tensor that every rank of the node maps.

    store: [L, 2 (k/v), Hkv, host_blocks * block_size, D]

Prefill ranks write the rectangle they own (a pipeline stage: its layers x all KV heads; a tensor-parallel
rank: all layers x its KV heads). Decode ranks read theirs into their paged device pool (`load_into`), one
move of the KV re-shard plan (`parallel/kv_plan.py`) at a time, and write a swapped-out sequence's KV back
(`save_from`, the inverse). Head-major means a tensor-parallel rank's slice of a token range is contiguous
per (layer, k/v).

The backing file lives in /dev/shm under a per-job name, private to its user (created 0600, exclusively, no
symlink followed), its pages reserved up front (a /dev/shm too small is one error at start-up, not SIGBUS),
and is unlinked as soon as every rank has mapped it, so nothing is left behind, whether the job ends well
or not (a rank stopped before that removes it; a killed one leaves it to the next start-up's sweep).
`open_host_store` opens one store per /dev/shm domain across the ranks (each node's own, when nodes do not
share one).
"""
from __future__ import annotations

import os
import uuid

import torch

from seesaw_ds.distributed.node import node_key
from seesaw_ds.distributed.master_io import create_shm_file, unlink_shm_file
from seesaw_ds.distributed.shm_buffers import shm_dir
from seesaw_ds.models.config import ModelConfig


PAGE_BYTES = 4096
MAX_SLICE_RUNS = 8     # above this many runs of slots, one index_copy_ beats a copy per run


def slot_runs(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """[(first token index, first slot, length)] for each run of consecutive slots; e.g. slots
    [8, 9, 10, 32, 33] -> [(0, 8, 3), (3, 32, 2)]. Prefill slots come in runs as long as a sequence's
    consecutive host blocks, so a few slice copies replace a scattered index_copy_."""
    slots = slots.cpu()
    if slots.numel() == 0:
        return []
    breaks = (torch.nonzero(slots[1:] - slots[:-1] != 1).flatten() + 1).tolist()
    starts = [0] + breaks
    ends = breaks + [slots.numel()]
    first = slots[starts].tolist()
    return [(a, f, b - a) for a, b, f in zip(starts, ends, first)]


class HostKVStore:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, path: str,
                 create: bool, budget: str = "the host KV store"):
        """`create`: make the file (private: mode 0600, O_EXCL | O_NOFOLLOW, so an existing file or a planted
        symlink is refused) and reserve its pages, else map the file another rank made. `budget` names the
        setting that sized it in the error a full /dev/shm gives (e.g. "kv.host_gb=4")."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        numel = 1
        for n in self.shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.path = path
        fd = None
        if create:      # the node's pages now (posix_fallocate), not a SIGBUS mid-prefill
            fd = create_shm_file(path, nbytes, purpose=f"the host KV store ({budget})",
                                 remedy=f"lower {budget.split('=')[0]}" if "=" in budget else "free memory")
        elif not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) != nbytes:
            raise RuntimeError(f"the host KV store {path} is missing or holds the wrong size on this node: every "
                               f"rank of a replica must share one node's /dev/shm")
        try:
            self.tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(self.shape)
            self.fault_in()
        except BaseException:
            if create:
                unlink_shm_file(path)
            raise
        finally:
            if fd is not None:
                os.close(fd)
        self._runs: tuple[torch.Tensor | None, list] = (None, [])     # (slots, their runs) of the last write
        self._layers = (self.tensor, self.tensor.unbind(0))            # per layer [2, Hkv, tokens, D] views

    def fault_in(self) -> None:
        """Map every page writable in this process up front (one element per page): first touches of a
        shared mapping fault page by page, which made the first prefill's stash several times slower."""
        flat = self.tensor.view(-1)
        flat[::max(1, PAGE_BYTES // flat.element_size())].zero_()

    @staticmethod
    def new_path(job_token: str | None = None) -> str:
        return os.path.join(shm_dir(), f"seesaw-kv-{node_key()}-{job_token or uuid.uuid4().hex}")

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def close(self) -> None:
        """Drop this process's mapping (the memory goes back once no view of it is left) and the name."""
        self.unlink()
        self.tensor = torch.empty((0,) * len(self.shape), dtype=self.tensor.dtype)

    def unlink(self) -> None:
        unlink_shm_file(self.path)

    # ---- the attention hook's sink during prefill ---------------------------------------------------
    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
              kv_heads: range) -> None:
        """key/value: [1, Hkv_r, T, D] for the global `kv_heads` -> store[layer, k/v, kv_heads, slots, :].
        Safe from one background thread (see stash.py)."""
        h = slice(kv_heads.start, kv_heads.stop)
        k, v = key[0], value[0]                                        # [Hkv_r, T, D]; copy_ casts and moves
        if self._runs[0] is not slots:                                 # once per micro-batch, not per layer
            runs = slot_runs(slots)
            capacity = self.shape[3]
            if any(dst < 0 or dst + n > capacity for _, dst, n in runs):
                raise IndexError(f"host KV slot index out of range: the store holds {capacity} token slots")
            self._runs = (slots, runs)
        runs = self._runs[1]
        if self._layers[0] is not self.tensor:                         # views made once per backing tensor
            self._layers = (self.tensor, self.tensor.unbind(0))
        layer_kv = self._layers[1][layer]                              # [2, Hkv, tokens, D]
        if len(runs) > MAX_SLICE_RUNS:                                  # fragmented blocks: one scattered copy
            index = slots.to(self.tensor.device)
            layer_kv[0, h].index_copy_(1, index, k.to(self.tensor.dtype))
            layer_kv[1, h].index_copy_(1, index, v.to(self.tensor.dtype))
            return
        if len(runs) == 1:                                             # the common case: one copy per k / v
            _, dst, n = runs[0]
            layer_kv[0, h, dst:dst + n].copy_(k)
            layer_kv[1, h, dst:dst + n].copy_(v)
            return
        for src, dst, n in runs:                                       # one strided copy per run of slots
            layer_kv[0, h, dst:dst + n].copy_(k[:, src:src + n])
            layer_kv[1, h, dst:dst + n].copy_(v[:, src:src + n])

    # ---- decode: whole blocks between the store and a device pool, one KV move at a time ----------------
    def _views(self, pool, moves, slices_of, host_blocks: list[int], device_blocks: list[int]):
        """Yield (store view [Lm, 2, Hm, k, bs, D], pool view [2, Lm, k, bs, Hm, D]) for every move of the
        re-shard plan (a rectangle of layers x KV heads; `slices_of(move)` locates it in this rank's pool)
        and every run of k blocks consecutive in both block lists."""
        if len(host_blocks) != len(device_blocks):
            raise ValueError(f"{len(device_blocks)} device blocks for {len(host_blocks)} host blocks")
        bs, runs = self.block_size, block_runs(host_blocks, device_blocks)
        for move in moves:
            layers, heads = move.rect.slices
            pool_layers, pool_heads = slices_of(move)
            rect = self.tensor[layers, :, heads]                  # [Lm, 2, Hm, tokens, D]
            lm, _, hm, _, d = rect.shape
            for h0, d0, k in runs:
                host = rect[:, :, :, h0 * bs:(h0 + k) * bs].view(lm, 2, hm, k, bs, d)
                yield host, pool.tensor[:, pool_layers, d0:d0 + k, :, pool_heads]

    def load_into(self, pool, moves, host_blocks: list[int], device_blocks: list[int]) -> int:
        """Copy `host_blocks` into `device_blocks` of `pool` for every move into this rank (the pool holds
        the moves' destination rectangle); returns bytes moved."""
        moved = 0
        for host, device in self._views(pool, moves, lambda m: m.dst_slices, host_blocks, device_blocks):
            device.copy_(host.permute(1, 0, 3, 4, 2, 5))     # [Lm, 2, Hm, k, bs, D] -> [2, Lm, k, bs, Hm, D]
            moved += device.numel() * device.element_size()
        return moved

    def save_from(self, pool, moves, device_blocks: list[int], host_blocks: list[int]) -> int:
        """The inverse of load_into (swap-out): `device_blocks` of `pool` into `host_blocks`, for every move
        out of this rank (the pool holds the moves' source rectangle); returns bytes moved."""
        moved = 0
        for host, device in self._views(pool, moves, lambda m: m.src_slices, host_blocks, device_blocks):
            host.copy_(device.permute(1, 0, 4, 2, 3, 5))     # [2, Lm, k, bs, Hm, D] -> [Lm, 2, Hm, k, bs, D]
            moved += device.numel() * device.element_size()
        return moved


def block_runs(src_blocks: list[int], dst_blocks: list[int]) -> list[tuple[int, int, int]]:
    """[(first source block, first destination block, k)] for each run of blocks consecutive in both lists:
    one strided copy per run instead of a gather and scatter of the whole list."""
    runs, i = [], 0
    while i < len(src_blocks):
        k = 1
        while i + k < len(src_blocks) and src_blocks[i + k] == src_blocks[i] + k and \
                dst_blocks[i + k] == dst_blocks[i] + k:
            k += 1
        runs.append((src_blocks[i], dst_blocks[i], k))
        i += k
    return runs


def open_host_store(comm, places: list, cfg, blocks, block_size, dtype, budget: str) -> HostKVStore:
    """One store per /dev/shm domain (placement.py has checked that every KV move stays inside one): the
    domain's first rank creates it (a full /dev/shm: one error naming `budget` and the free space, on every
    rank), the domain's other ranks map it, then its name goes. On any failure no file is left."""
    if len({p.shm for p in places}) > 1:
        return _open_store_per_domain(comm, places, cfg, blocks, block_size, dtype, budget)
    path = comm.broadcast_object(HostKVStore.new_path() if comm.rank == 0 else None, src=0)
    store = comm.on_rank0_then_all(lambda: HostKVStore(cfg, blocks, block_size, dtype, path,
                                                       create=comm.rank == 0, budget=budget))
    try:
        comm.barrier()
    finally:
        if comm.rank == 0:
            store.unlink()    # every rank has it mapped (or failed): the name goes, the memory stays until close
    return store


def _open_store_per_domain(comm, places, cfg, blocks, block_size, dtype, budget: str) -> HostKVStore:
    """As `open_host_store` on one domain, with every domain's first rank creating at once; a failure in any
    domain is raised on every rank as the same exception where it survives pickling (as
    `comm.on_rank0_then_all` does), so a full /dev/shm on any node is one clear error."""
    from seesaw_ds.engine.comm import sendable
    mine = places[comm.rank].shm
    leader = min(r for r, p in enumerate(places) if p.shm == mine)
    path = comm.all_gather_object(HostKVStore.new_path() if comm.rank == leader else None)[leader]
    store, failure = None, None
    if comm.rank == leader:
        try:
            store = HostKVStore(cfg, blocks, block_size, dtype, path, create=True, budget=budget)
        except Exception as err:  # noqa: BLE001 - raised on every rank below
            failure = err
    failures = [f for f in comm.all_gather_object(None if failure is None else sendable(failure)) if f is not None]
    if failures:
        if failure is not None:
            raise failure
        first = failures[0]
        raise first if isinstance(first, BaseException) else RuntimeError(
            f"a node's host KV store could not be created: {first}")
    try:
        if store is None:
            store = HostKVStore(cfg, blocks, block_size, dtype, path, create=False, budget=budget)
        comm.barrier()
    finally:
        if comm.rank == leader:
            store.unlink()     # the domain's ranks have it mapped (or failed): the name goes
    return store
