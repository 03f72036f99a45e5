"""Stage executors of the distributed engine. Each one runs a list of micro-batches against a KV target
and says which KV rectangle (layers x KV heads) this rank owns under its layout.

    LocalStageExecutor     tp=1, pp=1: all layers, all heads, one process per replica
    TensorParallelExecutor tp>1: DeepSpeed AutoTP module (o_proj/down_proj/lm_head all-reduce)
    PipelineExecutor       pp>1: DeepSpeed pipeline engine (see pipe_executor.py)
"""
from __future__ import annotations

import torch

from seesaw_ds.distributed.master import MasterWeights, build_hf_model
from seesaw_ds.engine.inputs import ModelInputs
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.models.runner import ModelRunner
from seesaw_ds.parallel.layout import Layout
from seesaw_ds.parallel.weight_plan import shard_entries, tp_head_ranges


def bind_to_master(module: torch.nn.Module, entries, master: MasterWeights) -> int:
    """Point every sharded parameter AutoTP materialised at the equal view of the master copy, so the node
    keeps one copy of the weights whatever the layout. Returns the bytes released."""
    params = dict(module.named_parameters(remove_duplicate=False))
    released = 0
    for entry in entries:
        param = params.get(entry.name)
        if param is None:
            continue
        view = master[entry.source_name][entry.source_slices]
        if param.shape != view.shape or param.dtype != view.dtype:
            raise RuntimeError(f"AutoTP shard {entry.name} {tuple(param.shape)} {param.dtype} does not match the "
                               f"plan's {tuple(view.shape)} {view.dtype}")
        if param.data_ptr() != view.data_ptr():
            if not torch.equal(param.data, view):
                raise RuntimeError(f"AutoTP shard {entry.name} differs from the master copy's slice")
            released += param.numel() * param.element_size()
            param.data = view
    return released


class LocalStageExecutor:
    def __init__(self, runner: ModelRunner, cfg: ModelConfig):
        self.runner = runner
        self.layers, self.kv_heads = range(cfg.num_layers), range(cfg.num_kv_heads)
        self.sampling_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    def micro_batches(self, is_prefill: bool) -> int:
        """How many micro-batches a step of this stage is cut into (the engine's default)."""
        return 1

    @torch.inference_mode()
    def run(self, micro_inputs: list[ModelInputs], kv) -> torch.Tensor:
        return torch.cat([self.runner.forward(m.input_ids, m.positions, m.meta, kv, m.logits_indices)
                          for m in micro_inputs])


class TensorParallelExecutor(LocalStageExecutor):
    def __init__(self, folder: str, master: MasterWeights, dtype: torch.dtype, cfg: ModelConfig, layout: Layout):
        import deepspeed
        model = build_hf_model(folder, master, dtype)
        engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": layout.tp}, dtype=dtype,
                                          replace_with_kernel_inject=False)
        super().__init__(ModelRunner(engine.module), cfg)
        tp_rank = layout.coords(torch.distributed.get_rank()).tp_rank
        self.bound_bytes = bind_to_master(engine.module, shard_entries(cfg, layout, 0, tp_rank), master)
        self.kv_heads = tp_head_ranges(cfg, layout.tp)[tp_rank][1]
        self.sampling_rank = layout.global_rank(layout.coords(torch.distributed.get_rank()).dp_index, 0, 0)


def build_executor(layout: Layout, folder: str, master: MasterWeights, dtype: torch.dtype, cfg: ModelConfig,
                   shared_runner: ModelRunner):
    """`shared_runner` is this rank's full-width model (views of the master copy) for tp=1 layouts."""
    if layout.tp > 1 and layout.pp > 1:
        raise NotImplementedError(f"layout {layout.describe()}: tp and pp together are not supported yet")
    if layout.tp > 1:
        return TensorParallelExecutor(folder, master, dtype, cfg, layout)
    if layout.pp > 1:
        from seesaw_ds.distributed.pipe_executor import PipelineExecutor
        return PipelineExecutor(shared_runner, cfg.num_layers, cfg.num_kv_heads, layout.pp, cfg.sliding_window)
    return LocalStageExecutor(shared_runner, cfg)
