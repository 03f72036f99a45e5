"""Runs a Hugging Face Llama-family model over packed, ragged batches with the paged KV pool.

The layer math is transformers' own (so every checkpoint stays exact); attention is ours, through the
registered `seesaw_paged` hook, and the norms and MLP activation run fused ops with the same rounding. Decode
steps take the lean path (models/decode_path.py): the same ops over the same weights, called directly. The
model is split into three pieces that a pipeline stage can own:

    embed(input_ids)                      [T] -> [1, T, H]
    run_layers(h, positions, layers)      [1, T, H] -> [1, T, H]   (layers: a contiguous global range)
    head(h, logits_indices)               [1, T, H] -> [B, V] float32 (or this rank's vocabulary slice of it,
                                                            ShardedLogits, under a vocabulary-parallel head)
"""
from __future__ import annotations

import torch

from seesaw_ds.kv.attention import ATTN_IMPLEMENTATION, AttentionMetadata, paged_attention
from seesaw_ds.kv.pool import KVPool
from seesaw_ds.models.decode_path import LeanDecoder, lean_decode_enabled
from seesaw_ds.models.fused import use_fused_layer_ops, use_fused_rope
from seesaw_ds.models.vocab_head import ShardedLogits, VocabShard


def use_paged_attention(hf_model) -> None:
    """Route the model's attention through `seesaw_paged` (plain SDPA outside an engine forward)."""
    try:
        hf_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    except (AttributeError, ValueError, KeyError):
        hf_model.config._attn_implementation = ATTN_IMPLEMENTATION


class ModelRunner:
    def __init__(self, hf_model):
        use_paged_attention(hf_model)
        use_fused_layer_ops(hf_model)
        use_fused_rope(hf_model)
        inner = hf_model.model
        self.hf_model = hf_model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = hf_model.lm_head
        self.lean = LeanDecoder(self.layers, self.lm_head) if lean_decode_enabled() else None
        self.vocab_shard: VocabShard | None = None

    def shard_vocab(self, head: torch.nn.Linear, shard: VocabShard) -> None:
        """Project onto this rank's rows of the vocabulary only (`head`: those rows, [V_r, H]); `head()` then
        returns ShardedLogits (models/vocab_head.py)."""
        self.lm_head, self.vocab_shard = head, shard
        if self.lean is not None:
            self.lean.set_head(head)

    def follow_weights(self, weights_key) -> None:
        """`weights_key()` names the current weights (the master copy's key): derived copies made for
        decode (packed linears) are dropped when it changes."""
        if self.lean is not None:
            self.lean.weights_key = weights_key

    def release_derived(self) -> None:
        """Drop the weight copies made for decode (made again on next use)."""
        if self.lean is not None:
            self.lean.release_packed()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids[None, :])                     # [1, T, H]

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, layers: range,
                   meta: AttentionMetadata, pool: KVPool) -> torch.Tensor:
        position_ids = positions[None, :]                                # [1, T]
        cos_sin = self.rotary_emb(h, position_ids)
        if not meta.is_prefill and self.lean is not None and self.lean.supported:
            return self.lean.run(h, cos_sin, layers, meta, pool)
        with paged_attention(meta, pool):
            for i in layers:
                h = self.layers[i](h, attention_mask=None, position_ids=position_ids,
                                   position_embeddings=cos_sin)
        return h

    def head(self, h: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        # only the rows that are sampled go through the norm and the (large) vocabulary projection
        h = self.norm(h[:, logits_indices])                              # [1, B, H]
        logits = self.lean.head(h) if self.lean is not None and self.lean.supported else None
        if logits is None:
            logits = self.lm_head(h)                                     # AutoTP's head wants 3-D
        logits = logits[0].float()                                       # [B, V] (or [B, V_r])
        return logits if self.vocab_shard is None else ShardedLogits(logits, self.vocab_shard)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                pool: KVPool, logits_indices: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        h = self.run_layers(h, positions, range(len(self.layers)), meta, pool)
        return self.head(h, logits_indices)
