"""The node's host KV store: one shared, head-major tensor that every rank of the node maps.

    store: [L, 2 (k/v), Hkv, host_blocks * block_size, D]

Prefill ranks write the rectangle they own (a pipeline stage: its layers x all KV heads; a tensor-parallel
rank: all layers x its KV heads). Decode ranks read theirs into their paged device pool. Head-major means a
tensor-parallel rank's slice of a token range is contiguous per (layer, k/v).

The backing file lives in /dev/shm under a per-job name and is unlinked as soon as every rank has mapped it,
so nothing is left behind, whether the job ends well or not.
"""
from __future__ import annotations

import os
import uuid

import torch

from seesaw_ds.models.config import ModelConfig


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")


class HostKVStore:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, path: str,
                 create: bool):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_blocks * block_size, cfg.head_dim)
        numel = 1
        for n in self.shape:
            numel *= n
        if create:
            with open(path, "wb") as f:
                f.truncate(numel * torch.empty((), dtype=dtype).element_size())
        self.path = path
        self.tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(self.shape)
        # set per stage by the executor: which (layers, kv heads) this rank writes or reads
        self.layers: range = range(cfg.num_layers)
        self.kv_heads: range = range(cfg.num_kv_heads)

    @staticmethod
    def new_path(job_token: str | None = None) -> str:
        return os.path.join(shm_dir(), f"seesaw-kv-{job_token or uuid.uuid4().hex}")

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ---- the attention hook's sink during prefill ---------------------------------------------------
    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
              kv_heads: range | None = None) -> None:
        """key/value: [1, Hkv_r, T, D] for `kv_heads` (default: this rank's `self.kv_heads`)
        -> store[layer, k/v, heads, slots, :]. Safe from one background thread (see stash.py)."""
        heads = self.kv_heads if kv_heads is None else kv_heads
        h = slice(heads.start, heads.stop)
        dev, dtype = self.tensor.device, self.tensor.dtype
        slots = slots.to(dev)
        self.tensor[layer, 0, h].index_copy_(1, slots, key[0].to(dev, dtype))
        self.tensor[layer, 1, h].index_copy_(1, slots, value[0].to(dev, dtype))

    # ---- onboarding into a device pool ---------------------------------------------------------------
    def token_index(self, host_blocks: list[int]) -> torch.Tensor:
        b = torch.tensor(host_blocks, dtype=torch.long)
        return (b[:, None] * self.block_size + torch.arange(self.block_size)).reshape(-1)

    def load_into(self, pool, host_blocks: list[int], device_blocks: list[int]) -> int:
        """Copy this rank's rectangle of `host_blocks` into `device_blocks` of `pool`; returns bytes moved."""
        if not host_blocks:
            return 0
        spec = pool.spec
        l = slice(spec.layers.start, spec.layers.stop)
        h = slice(spec.kv_heads.start, spec.kv_heads.stop)
        rows = self.tensor[l, :, h].index_select(3, self.token_index(host_blocks))   # [Lr, 2, Hr, n*bs, D]
        lr, _, hr, _, d = rows.shape
        rows = rows.view(lr, 2, hr, len(host_blocks), self.block_size, d).permute(1, 0, 3, 4, 2, 5)
        dst = torch.tensor(device_blocks, dtype=torch.long, device=pool.tensor.device)
        pool.tensor.index_copy_(2, dst, rows.to(pool.tensor.device, pool.tensor.dtype))  # [2, Lr, n, bs, Hr, D]
        return rows.numel() * rows.element_size()
