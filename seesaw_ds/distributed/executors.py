"""Stage executors. Each one runs a list of micro-batches against a KV target and holds one rectangle of the
model: `layers` x `kv_heads` (global indices), which the runtime checks against the KV re-shard plan.

    LocalStageExecutor     tp=1, pp=1: all layers, all heads, one process per replica
    TensorParallelExecutor tp>1: DeepSpeed AutoTP module (o_proj/down_proj/lm_head all-reduce)
    PipelineExecutor       pp>1: DeepSpeed pipeline engine (see pipe_executor.py)
"""
from __future__ import annotations

import torch

from seesaw_ds.distributed.master import build_hf_model
from seesaw_ds.distributed.weight_views import WeightViews
from seesaw_ds.engine.inputs import ModelInputs
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.models.decode_path import tp_all_reduce
from seesaw_ds.models.vocab_head import ShardedLogits, VocabShard, rows_linear
from seesaw_ds.models.runner import ModelRunner
from seesaw_ds.parallel.layout import Layout
from seesaw_ds.parallel.weight_plan import shard_entries, tp_head_ranges, vocab_head_entry, vocab_rows


class LocalStageExecutor:
    def __init__(self, runner: ModelRunner, cfg: ModelConfig):
        self.runner = runner
        self.layers, self.kv_heads = range(cfg.num_layers), range(cfg.num_kv_heads)

    def micro_batches(self, is_prefill: bool) -> int:
        """How many micro-batches a step of this stage is cut into (the engine's default)."""
        return 1

    @torch.inference_mode()
    def run(self, micro_inputs: list[ModelInputs], kv) -> torch.Tensor | ShardedLogits:
        parts = [self.runner.forward(m.input_ids, m.positions, m.meta, kv, m.logits_indices) for m in micro_inputs]
        if len(parts) == 1:
            return parts[0]
        return ShardedLogits.cat(parts) if isinstance(parts[0], ShardedLogits) else torch.cat(parts)


class TensorParallelExecutor(LocalStageExecutor):
    """AutoTP over a fresh model built on the master copy; its shards are then re-pointed at the plan's
    slices of the master copy, so the node keeps one copy of the weights whatever the layout. The logits
    come from a vocabulary-parallel head over this rank's rows of the same copy (models/vocab_head.py)
    instead of AutoTP's hidden-split head and its all-reduce of every logit."""

    def __init__(self, folder: str, weights: WeightViews, dtype: torch.dtype, cfg: ModelConfig, layout: Layout,
                 rank: int):
        import deepspeed
        model = build_hf_model(folder, weights.master, dtype)
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": layout.tp}, dtype=dtype,
                                          replace_with_kernel_inject=False)
        super().__init__(ModelRunner(engine.module), cfg)
        self.runner.follow_weights(lambda: weights.content_key)
        tp_rank = layout.coords(rank).tp_rank
        self.bound_bytes = weights.bind(engine.module, shard_entries(cfg, layout, 0, tp_rank))
        self.kv_heads = tp_head_ranges(cfg, layout.tp)[tp_rank][1]
        if getattr(engine.module.lm_head, "bias", None) is None:
            self._shard_vocab(engine.module.lm_head, weights, cfg, layout.tp, tp_rank)

    def _shard_vocab(self, autotp_head, weights: WeightViews, cfg: ModelConfig, tp: int, tp_rank: int) -> None:
        shard = vocab_shard(cfg, tp, tp_rank, autotp_head)
        head = rows_linear(torch.empty(shard.stop - shard.start, cfg.hidden_size, dtype=autotp_head.weight.dtype))
        weights.bind(head, (vocab_head_entry(cfg, tp, tp_rank),))   # re-pointed at the master copy's rows
        self.runner.shard_vocab(head, shard)


def vocab_shard(cfg: ModelConfig, tp: int, tp_rank: int, autotp_head) -> VocabShard:
    """TP rank `tp_rank`'s rows of the vocabulary (the weight plan's cut), exchanged over AutoTP's group."""
    rows = vocab_rows(cfg, tp)[tp_rank]
    return VocabShard(rows.start, rows.stop, cfg.vocab_size, tp_rank, tp, tp_all_reduce(autotp_head))


def build_executor(layout: Layout, rank: int, folder: str | None, weights: WeightViews, dtype: torch.dtype,
                   cfg: ModelConfig, shared_runner: ModelRunner):
    """`shared_runner` is this rank's full-width model (views of the master copy) for tp=1 layouts."""
    if layout.tp > 1 and layout.pp > 1:
        raise NotImplementedError(f"layout {layout.describe()}: tp and pp together are not supported yet")
    if layout.tp > 1:
        return TensorParallelExecutor(folder, weights, dtype, cfg, layout, rank)
    if layout.pp > 1:
        from seesaw_ds.distributed.pipe_executor import PipelineExecutor
        return PipelineExecutor(shared_runner, cfg.num_layers, cfg.num_kv_heads, layout.pp, cfg.sliding_window)
    return LocalStageExecutor(shared_runner, cfg)
