"""The paged device KV pool: one tensor, addressed by (layer range, KV-head range).

    pool: [2 (k/v), L_local, num_blocks, block_size, kv_heads_local, head_dim]

A pipeline rank holds a slice of layers (all heads); a tensor-parallel rank holds all layers and a slice
of KV heads. `layer_offset` maps a model's global layer index to the local one.

On a CPU the pool sits on transparent huge pages where Linux offers them (`madvise(MADV_HUGEPAGE)` before
the pages are first touched): a decode step reads every sequence's blocks, scattered over the whole pool, and
with 4 KiB pages nearly every block costs a TLB miss, which also keeps the prefetches from running ahead.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

import torch

from seesaw_ds.models.config import ModelConfig

log = logging.getLogger("seesaw_ds")
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


@dataclass(frozen=True)
class KVPoolSpec:
    layers: range            # global layer indices held here
    kv_heads: range          # global KV-head indices held here
    num_blocks: int
    block_size: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self):
        if self.num_blocks <= 0:
            raise ValueError(f"KV pool needs at least one block, got num_blocks={self.num_blocks}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (2, len(self.layers), self.num_blocks, self.block_size, len(self.kv_heads), self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * len(self.layers) * self.block_size * len(self.kv_heads) * self.head_dim * itemsize

    @classmethod
    def from_budget(cls, cfg: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype,
                    layers: range | None = None, kv_heads: range | None = None) -> "KVPoolSpec":
        layers = layers if layers is not None else range(cfg.num_layers)
        kv_heads = kv_heads if kv_heads is not None else range(cfg.num_kv_heads)
        probe = cls(layers, kv_heads, 1, block_size, cfg.head_dim, dtype)
        return cls(layers, kv_heads, max(1, budget_bytes // probe.bytes_per_block), block_size, cfg.head_dim, dtype)


def madvise(start: int, length: int, advice: int) -> bool:
    """`madvise(2)` on [start, start + length) (page-aligned); False when refused or there is no Linux libc."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0
    except (OSError, AttributeError):
        return False


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the whole 2 MiB pages inside a CPU tensor's memory with huge pages; False when
    there is no such page, or the OS (or a non-Linux libc) refused. Only pages not yet touched are affected."""
    if tensor.device.type != "cpu":
        return False
    nbytes = tensor.numel() * tensor.element_size()
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    length = (tensor.data_ptr() + nbytes - start) // HUGE_PAGE * HUGE_PAGE
    return length > 0 and madvise(start, length, MADV_HUGEPAGE)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A zeroed pool tensor; on a CPU, on huge pages where the OS gives them (see the module docstring)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    tensor = torch.empty(shape, dtype=dtype)
    if not advise_huge_pages(tensor) and tensor.numel() * tensor.element_size() >= 2 * HUGE_PAGE:
        log.debug("seesaw_ds: the KV pool stays on 4 KiB pages (madvise refused)")
    return tensor.zero_()


class KVPool:
    def __init__(self, spec: KVPoolSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        self.tensor = zeros(spec.shape, spec.dtype, device)

    def layer(self, global_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) views for one layer: each [num_blocks, block_size, kv_heads_local, head_dim]."""
        i = global_layer - self.spec.layers.start
        return self.tensor[0, i], self.tensor[1, i]

    def write(self, global_layer: int, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """key/value: [1, Hkv_local, T, D] -> rows `slots` of the flat [num_blocks * block_size] cache."""
        k_cache, v_cache = self.layer(global_layer)
        hkv, d = k_cache.shape[-2:]
        k_cache.view(-1, hkv, d).index_copy_(0, slots, key[0].transpose(0, 1).to(k_cache.dtype))
        v_cache.view(-1, hkv, d).index_copy_(0, slots, value[0].transpose(0, 1).to(v_cache.dtype))
