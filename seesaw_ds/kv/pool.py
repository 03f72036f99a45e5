"""The paged device KV pool: one tensor, addressed by (layer range, KV-head range).

    pool: [2 (k/v), L_local, num_blocks, block_size, kv_heads_local, head_dim]

A pipeline rank holds a slice of layers (all heads); a tensor-parallel rank holds all layers and a slice
of KV heads. `layer_offset` maps a model's global layer index to the local one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seesaw_ds.models.config import ModelConfig


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


class KVPool:
    def __init__(self, spec: KVPoolSpec, device: torch.device | str = "cpu"):
        self.spec = spec
        self.tensor = torch.zeros(spec.shape, dtype=spec.dtype, device=device)

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
