"""A Hugging Face Llama-family causal LM as a DeepSpeed `PipelineModule` for training, and its name map.

    pipe = pipeline_policy(hf_model, num_stages=2)          # every rank builds it; each keeps its stage
    engine, *_ = deepspeed.initialize(model=pipe, optimizer=..., config=ds_config)
    loss = engine.train_batch(iter([(input_ids, labels), ...]))      # right-padded, labels -100 at pads
    rollout = RolloutEngine(engine, tokenizer, ...)         # syncs from the stages via `pipe.hf_name_map`

Layer list (global layer index -> what it holds -> its parameters' Hugging Face names):

    0          embedding          model.embed_tokens.*     (tied: `tied_modules.embed.embed_tokens.*`)
    1 .. L     decoder layer i-1  model.layers.{i-1}.*
    L + 1      final norm         model.norm.*
    L + 2      LM head            lm_head.*                (tied: the embedding's weight, see below)

Between stages travels `(h [B, T, H], position_ids [B, T])`; the head returns logits [B, T, V] and
`loss_fn(logits, labels)` is next-token cross-entropy with Hugging Face's convention (labels are the input
ids, shifted inside; -100 is ignored). Attention is causal with no padding mask: right-pad sequences and set
their padded labels to -100 (left padding would let real tokens attend pads).

Tied embeddings (SmolLM2): the embedding and the head are one `TiedLayerSpec` key ("embed"); DeepSpeed
keeps one copy on the first and one on the last stage and all-reduces their gradients, so the copies stay
equal; the sync takes the lowest rank's copy. Untied: plain layers, the head its own `lm_head`.

The layers wrap the given model's own modules (no copy); every rank builds only its stage, and the model
reference is dropped after the build, so deleting `hf_model` frees the other stages' layers.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

TIED_KEY = "embed"


class _Source:
    """The model the layer specs take their modules from; released once the stage is built."""

    def __init__(self, hf_model):
        self.model = hf_model

    def base(self):
        if self.model is None:
            raise RuntimeError("the pipeline's source model was released after the build")
        return self.model.model


class PipeEmbedding(nn.Module):
    """input_ids [B, T] -> (h [B, T, H], position_ids [B, T])."""

    def __init__(self, source: _Source):
        super().__init__()
        self.embed_tokens = source.base().embed_tokens

    def forward(self, input_ids):
        b, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device).repeat(b, 1)   # contiguous: sent as is
        return self.embed_tokens(input_ids), positions


class PipeDecoderLayer(nn.Module):
    """One Hugging Face decoder layer: (h, position_ids) -> (h, position_ids)."""

    def __init__(self, source: _Source, index: int):
        super().__init__()
        base = source.base()
        self.layer = base.layers[index]
        self.rotary_emb = base.rotary_emb          # buffers only: each stage computes its own cos/sin
        self.config = base.config

    def forward(self, inputs):
        from transformers.masking_utils import create_causal_mask
        h, positions = inputs
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None,
                                  past_key_values=None, position_ids=positions)
        h = self.layer(h, attention_mask=mask, position_ids=positions,
                       position_embeddings=self.rotary_emb(h, position_ids=positions))
        return h, positions


class PipeNorm(nn.Module):
    """(h, position_ids) -> normed h [B, T, H]."""

    def __init__(self, source: _Source):
        super().__init__()
        self.norm = source.base().norm

    def forward(self, inputs):
        return self.norm(inputs[0])


class PipeHead(nn.Module):
    """Untied head: h [B, T, H] -> logits [B, T, V]."""

    def __init__(self, source: _Source):
        super().__init__()
        self.lm_head = source.model.lm_head

    def forward(self, h):
        return self.lm_head(h)


def _tied_logits(embedding: PipeEmbedding, h):
    """The tied head: h [B, T, H] @ embed_tokens.weight.T -> logits [B, T, V]."""
    return F.linear(h, embedding.embed_tokens.weight)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] (the input ids, -100 ignored) -> mean cross-entropy of t predicting t+1."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


class PipelineNames:
    """PipelineModule parameter names (`<layer index>.<local name>`, `tied_modules.<key>.<local name>`) ->
    Hugging Face names, for the layer list `pipeline_policy` builds. None for a name it does not know."""

    def __init__(self, num_layers: int, tied: bool):
        self.num_layers, self.tied = num_layers, tied

    def __call__(self, name: str) -> str | None:
        if name.startswith(f"tied_modules.{TIED_KEY}.embed_tokens."):
            return "model." + name[len(f"tied_modules.{TIED_KEY}."):]
        match = re.fullmatch(r"(\d+)\.(.+)", name)
        if match is None:
            return None
        index, local = int(match.group(1)), match.group(2)
        L = self.num_layers
        if index == 0 and local.startswith("embed_tokens."):
            return "model." + local
        if 1 <= index <= L and local.startswith("layer."):
            return f"model.layers.{index - 1}.{local[len('layer.'):]}"
        if index == L + 1 and local.startswith("norm."):
            return "model." + local
        if index == L + 2 and local.startswith("lm_head.") and not self.tied:
            return local
        return None

    def __repr__(self) -> str:
        return f"PipelineNames(num_layers={self.num_layers}, tied={self.tied})"


def pipeline_policy(hf_model, num_stages: int, loss_fn: Callable | None = None, **pipe_kwargs):
    """A DeepSpeed `PipelineModule` over `hf_model`'s embedding, decoder layers, final norm and head, cut
    into `num_stages` stages with balanced decoder-layer counts. Collective: call it on every rank (after
    `deepspeed.init_distributed()`). `pipe_kwargs` go to `PipelineModule` (topology,
    activation_checkpoint_interval, ...). The module carries `config` (the Hugging Face config, for a
    per-rank rollout engine) and `hf_name_map` (a `PipelineNames`, for the weight sync)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    config = hf_model.config
    num_layers = config.num_hidden_layers
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"num_stages must be in 1..{num_layers} (the decoder layers), got {num_stages}")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    source = _Source(hf_model)
    if tied:
        specs = [TiedLayerSpec(TIED_KEY, PipeEmbedding, source, tied_weight_attr=["embed_tokens.weight"])]
    else:
        specs = [LayerSpec(PipeEmbedding, source)]
    specs += [LayerSpec(PipeDecoderLayer, source, i) for i in range(num_layers)]
    specs.append(LayerSpec(PipeNorm, source))
    if tied:
        specs.append(TiedLayerSpec(TIED_KEY, PipeEmbedding, source, forward_fn=_tied_logits,
                                   tied_weight_attr=["embed_tokens.weight"]))
    else:
        specs.append(LayerSpec(PipeHead, source))
    pipe_kwargs.setdefault("partition_method", "type:PipeDecoderLayer")
    pipe_kwargs.setdefault("dynamic_shape", True)      # batches of changing length (see deepspeed-cpu-notes)
    pipe = PipelineModule(layers=specs, num_stages=num_stages, loss_fn=loss_fn or next_token_loss, **pipe_kwargs)
    source.model = None
    pipe.config = config
    pipe.hf_name_map = PipelineNames(num_layers, tied)
    return pipe
