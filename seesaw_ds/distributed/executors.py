"""Stage executors. Each one runs a list of micro-batches against a KV target and holds one rectangle of the
model: `layers` x `kv_heads` (global indices), which the runtime checks against the KV re-shard plan.

    LocalStageExecutor     tp=1, pp=1: all layers, all heads, one process per replica
    TensorParallelExecutor tp>1: DeepSpeed AutoTP module (o_proj/down_proj/lm_head all-reduce)
    PipelineExecutor       pp>1: DeepSpeed pipeline engine (see pipe_executor.py); with tp>1 too, each stage
                           is a TP group whose ranks run the stage's layers of an AutoTP module
"""
from __future__ import annotations

import contextlib

import torch

from seesaw_ds.distributed.master import build_hf_model
from seesaw_ds.distributed.weight_views import WeightViews
from seesaw_ds.engine.inputs import ModelInputs
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.models.decode_path import tp_all_reduce
from seesaw_ds.models.vocab_head import ShardedLogits, VocabShard, rows_linear
from seesaw_ds.models.runner import ModelRunner
from seesaw_ds.parallel.layout import Layout
from seesaw_ds.parallel.weight_plan import (shard_entries, stage_layer_ranges, tp_head_ranges, vocab_head_entry,
                                            vocab_rows)


class LocalStageExecutor:
    def __init__(self, runner: ModelRunner, cfg: ModelConfig):
        self.runner = runner
        self.layers, self.kv_heads = range(cfg.num_layers), range(cfg.num_kv_heads)

    def micro_batches(self, is_prefill: bool, tokens: int) -> int:
        """How many micro-batches a step of this stage is cut into (the engine's default)."""
        return 1

    @torch.inference_mode()
    def run(self, micro_inputs: list[ModelInputs], kv) -> torch.Tensor | ShardedLogits:
        parts = [self.runner.forward(m.input_ids, m.positions, m.meta, kv, m.logits_indices) for m in micro_inputs]
        if len(parts) == 1:
            return parts[0]
        return ShardedLogits.cat(parts) if isinstance(parts[0], ShardedLogits) else torch.cat(parts)


class TensorParallelExecutor(LocalStageExecutor):
    """AutoTP over all layers, one stage (see `autotp_runner`)."""

    def __init__(self, folder: str, weights: WeightViews, dtype: torch.dtype, cfg: ModelConfig, layout: Layout,
                 rank: int):
        runner, self.bound_bytes = autotp_runner(folder, weights, dtype, cfg, layout, rank)
        super().__init__(runner, cfg)
        self.kv_heads = tp_kv_heads(cfg, layout, rank)


class StageTPGroup:
    """DeepSpeed's `mpu` for AutoTP: the TP group of this rank's pipeline stage (AutoTP alone would take
    ranks 0 .. tp-1, once per process)."""

    def __init__(self, group, rank_in_group: int):
        self.group, self.rank_in_group = group, rank_in_group

    def get_model_parallel_group(self):
        return self.group

    def get_model_parallel_rank(self) -> int:
        return self.rank_in_group


def stage_tp_groups(layout: Layout, rank: int) -> StageTPGroup:
    """Every stage's TP group (every rank creates all of them, in one order); this rank's as an `mpu`."""
    import torch.distributed as dist
    coords = layout.coords(rank)
    groups = [dist.new_group(layout.tp_group_ranks(coords.dp_index, stage)) for stage in range(layout.pp)]
    return StageTPGroup(groups[coords.pp_stage], coords.tp_rank)


def autotp_runner(folder: str, weights: WeightViews, dtype: torch.dtype, cfg: ModelConfig, layout: Layout,
                  rank: int) -> tuple[ModelRunner, int]:
    """(runner, bytes released): AutoTP over a fresh model built on the master copy, its shards then
    re-pointed at the plan's slices of the master copy for this rank's stage, so the node keeps one copy of
    the weights whatever the layout (layers of other stages are emptied). The logits come from a
    vocabulary-parallel head over this rank's rows of the same copy (models/vocab_head.py) instead of AutoTP's
    hidden-split head and its all-reduce of every logit."""
    import deepspeed
    coords = layout.coords(rank)
    model = build_hf_model(folder, weights.master, dtype)
    tensor_parallel = {"tp_size": layout.tp}
    if layout.pp > 1:
        mpu = stage_tp_groups(layout, rank)
        tensor_parallel.update(mpu=mpu, tp_group=mpu.group)
    with stage_collectives(layout)():
        engine = deepspeed.init_inference(model, tensor_parallel=tensor_parallel, dtype=dtype,
                                          replace_with_kernel_inject=False)
    runner = ModelRunner(engine.module)
    runner.follow_weights(lambda: weights.content_key)
    bound = weights.bind(engine.module, shard_entries(cfg, layout, coords.pp_stage, coords.tp_rank))
    stage_layers = stage_layer_ranges(cfg.num_layers, layout.pp)[coords.pp_stage]
    for i, layer in enumerate(runner.layers):
        if i not in stage_layers:            # AutoTP's own shard copies of another stage's layers
            for param in layer.parameters():
                param.data = torch.empty(0, dtype=param.dtype)
    head = engine.module.lm_head
    if getattr(head, "bias", None) is None and coords.pp_stage == layout.pp - 1:
        shard = vocab_shard(cfg, layout.tp, coords.tp_rank, head)
        rows = rows_linear(torch.empty(shard.stop - shard.start, cfg.hidden_size, dtype=head.weight.dtype))
        weights.bind(rows, (vocab_head_entry(cfg, layout.tp, coords.tp_rank),))   # the master copy's rows
        runner.shard_vocab(rows, shard)
    return runner, bound


def stage_collectives(layout: Layout):
    """What a stage's TP collectives run under (build, forward, sampling): TP groups smaller than the node
    (TP x PP) all-reduce over their own backend, not DeepSpeed's node-wide shared-memory op."""
    return group_all_reduce if layout.tp > 1 and layout.pp > 1 else contextlib.nullcontext


@contextlib.contextmanager
def group_all_reduce():
    """While a TP group smaller than the node computes (a TP x PP stage), DeepSpeed's inference all-reduce
    takes the group's own backend: its shared-memory op sums over every rank of the node, whatever the group.
    The op is back on afterwards, for an engine whose TP group is the whole node."""
    from deepspeed.comm import comm as ds_comm
    cdb = ds_comm.cdb
    saved = getattr(cdb, "shm_vector_kernel_level", None)
    if saved is None:
        yield
        return
    cdb.shm_vector_kernel_level = 0
    try:
        yield
    finally:
        cdb.shm_vector_kernel_level = saved


def tp_kv_heads(cfg: ModelConfig, layout: Layout, rank: int) -> range:
    """The global KV heads `rank` holds under `layout`'s TP split (AutoTP's head groups)."""
    return tp_head_ranges(cfg, layout.tp)[layout.coords(rank).tp_rank][1]


def vocab_shard(cfg: ModelConfig, tp: int, tp_rank: int, autotp_head) -> VocabShard:
    """TP rank `tp_rank`'s rows of the vocabulary (the weight plan's cut), exchanged over AutoTP's group."""
    rows = vocab_rows(cfg, tp)[tp_rank]
    return VocabShard(rows.start, rows.stop, cfg.vocab_size, tp_rank, tp, tp_all_reduce(autotp_head))


def build_executor(layout: Layout, rank: int, folder: str | None, weights: WeightViews, dtype: torch.dtype,
                   cfg: ModelConfig, shared_runner: ModelRunner):
    """`shared_runner` is this rank's full-width model (views of the master copy) for tp=1 layouts."""
    if layout.pp > 1:
        from seesaw_ds.distributed.pipe_executor import PipelineExecutor
        runner, kv_heads = shared_runner, range(cfg.num_kv_heads)
        if layout.tp > 1:
            runner = autotp_runner(folder, weights, dtype, cfg, layout, rank)[0]
            kv_heads = tp_kv_heads(cfg, layout, rank)
        return PipelineExecutor(runner, cfg.num_layers, kv_heads, layout.pp, cfg.sliding_window, tp=layout.tp)
    if layout.tp > 1:
        return TensorParallelExecutor(folder, weights, dtype, cfg, layout, rank)
    return LocalStageExecutor(shared_runner, cfg)
