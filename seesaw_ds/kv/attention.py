"""Paged attention behind transformers' attention hook.

transformers' Llama-family attention modules compute q/k/v and RoPE, then call the registered attention
function. Ours writes the new K/V into the paged pool and attends over each sequence's own cache. The
per-forward metadata lives in a scoped context (`with paged_attention(meta, kv):`); outside one, the
function falls back to plain SDPA so the same module still serves `generate`.

`kv` is anything with `write(layer, key, value, slots)` (prefill) and `layer(i) -> (k_cache, v_cache)`
(decode): the device `KVPool`, or the host store when prefill stashes straight to the host tier.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from seesaw_ds.kv.native import paged_decode_op, prefill_attention_op
from seesaw_ds.kv.pool import KVPool

ATTN_IMPLEMENTATION = "seesaw_paged"


@dataclass
class AttentionMetadata:
    """What one forward over a packed batch needs. T = total new tokens, B = sequences."""
    is_prefill: bool
    slot_mapping: torch.Tensor          # [T] long: block * block_size + offset of each new token
    cu_seqlens: list[int]               # prefill: B + 1 offsets into the packed tokens
    block_tables: torch.Tensor | None   # decode: [B, max_blocks] long (padded with 0)
    context_lens: torch.Tensor | None   # decode: [B] long, tokens in cache including the new one
    sliding_window: int | None = None
    _groups: list | None = None               # decode: length-sorted groups, built once per forward
    _cu_tensor: torch.Tensor | None = None    # prefill: cu_seqlens as int64, built once per forward

    def cu_seqlens_tensor(self) -> torch.Tensor:
        if self._cu_tensor is None:
            self._cu_tensor = torch.tensor(self.cu_seqlens, dtype=torch.long)
        return self._cu_tensor

    def decode_groups(self, block_size: int, group: int = 16):
        """Sequences sorted by context length, in groups of `group`: each group gathers only up to its own
        longest context, so a batch mixing short and long sequences does not pay for the padding.
        -> [(rows [b], block_tables [b, m], mask [b, 1, 1, m * block_size])]"""
        if self._groups is None:
            order = torch.argsort(self.context_lens)
            self._groups = []
            for start in range(0, len(order), group):
                rows = order[start:start + group]
                lens = self.context_lens[rows]
                m = int(-(-int(lens.max()) // block_size))
                mask = decode_visibility_mask(lens, m * block_size, self.sliding_window)
                self._groups.append((rows, self.block_tables[rows, :m], mask))
        return self._groups


_CURRENT: contextvars.ContextVar[tuple[AttentionMetadata, KVPool] | None] = \
    contextvars.ContextVar("seesaw_attention", default=None)


@contextlib.contextmanager
def paged_attention(meta: AttentionMetadata, pool: KVPool):
    token = _CURRENT.set((meta, pool))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def in_engine_forward() -> bool:
    """Whether the caller runs inside an engine forward (`with paged_attention(...)`)."""
    return _CURRENT.get() is not None


def decode_visibility_mask(context_lens: torch.Tensor, max_len: int, window: int | None = None) -> torch.Tensor:
    """[B, 1, 1, max_len] bool: key j visible to the newest token of a sequence with context length n."""
    j = torch.arange(max_len, device=context_lens.device)[None, :]
    n = context_lens[:, None]
    visible = j < n
    if window is not None:
        visible &= j > n - 1 - window
    return visible[:, None, None, :]


def _prefill(query, key, value, meta: AttentionMetadata, scaling: float, window: int | None):
    # query: [1, H, T, D]; key/value: [1, Hkv, T, D]; each sequence attends causally to itself only.
    op = prefill_attention_op() if query.device.type == "cpu" and query.dtype == torch.bfloat16 else None
    longest = max(b - a for a, b in zip(meta.cu_seqlens[:-1], meta.cu_seqlens[1:]))
    if op is not None and query.shape[-1] in (64, 128) and (window is None or longest <= window):
        out = op(query[0], key[0].to(query.dtype), value[0].to(query.dtype), meta.cu_seqlens_tensor(),
                 float(scaling))                             # [T, H, D]
        return out.unsqueeze(0)                              # [1, T, H, D]
    outs = []
    for start, end in zip(meta.cu_seqlens[:-1], meta.cu_seqlens[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        n = end - start
        if window is not None and n > window:
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, scale=scaling, enable_gqa=True)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2)          # [1, T, H, D]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scaling: float, op=None) -> torch.Tensor:
    """q [B, H, D] (one new token per sequence) over each sequence's cached keys -> [B, H, D].

    `op` is `paged_decode_op()` fetched once by a caller that runs many layers (None: fetch it here)."""
    op = op or (paged_decode_op() if q.device.type == "cpu" else None)
    if op is not None:                                      # reads the pool in place: no gather
        return op(q, k_cache, v_cache, meta.block_tables, meta.context_lens, float(scaling),
                  meta.sliding_window or 0)
    q = q.unsqueeze(2)                                      # [B, H, 1, D]
    bs, hkv, d = k_cache.shape[1:]
    out = torch.empty_like(q)
    for rows, tables, mask in meta.decode_groups(bs):
        b, m = tables.shape
        # gathered: [b, m * block_size, Hkv, D] -> [b, Hkv, S, D]
        k = k_cache[tables].view(b, m * bs, hkv, d).transpose(1, 2)
        v = v_cache[tables].view(b, m * bs, hkv, d).transpose(1, 2)
        out[rows] = F.scaled_dot_product_attention(q[rows], k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                                   scale=scaling, enable_gqa=True)
    return out[:, :, 0]                                     # [B, H, D]


def _decode(query, pool: KVPool, layer: int, meta: AttentionMetadata, scaling: float):
    # query: [1, H, B, D] (one new token per sequence)
    k_cache, v_cache = pool.layer(layer)                    # [num_blocks, block_size, Hkv, D]
    return decode_attention(query[0].transpose(0, 1), k_cache, v_cache, meta, scaling).unsqueeze(0)


def seesaw_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, **kwargs):
    current = _CURRENT.get()
    if current is None:                                     # not inside an engine forward: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    meta, pool = current
    layer = module.layer_idx
    pool.write(layer, key, value, meta.slot_mapping)      # the device pool, or the host store in prefill
    if meta.is_prefill:
        return _prefill(query, key, value, meta, scaling, sliding_window), None
    return _decode(query, pool, layer, meta, scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, seesaw_attention_forward)
