"""Bring up the distributed engine on every rank: process group, master weights, host KV store, the two
stage executors and the device pool of the decode layout."""
from __future__ import annotations

import atexit
import ctypes
import logging
import os

import torch
import torch.distributed as dist

from seesaw_ds.distributed.engine import DistributedEngine
from seesaw_ds.distributed.executors import build_executor
from seesaw_ds.distributed.host_kv import HostKVStore
from seesaw_ds.distributed.shm_buffers import cleanup_deepspeed_shm
from seesaw_ds.distributed.master import MasterWeights, build_hf_model, prepare_master
from seesaw_ds.engine.scheduler import SchedulerConfig
from seesaw_ds.engine.seesaw_scheduler import SeesawScheduler, TierConfig
from seesaw_ds.kv.pool import KVPool, KVPoolSpec
from seesaw_ds.models.config import parse_dtype
from seesaw_ds.models.loader import default_cache_dir, load_model_config, resolve_model_folder
from seesaw_ds.models.runner import ModelRunner
from seesaw_ds.parallel.layout import StageLayouts, resolve_layouts

log = logging.getLogger("seesaw_ds")


def check_kv_budget(cfg, name: str, gb: float, max_model_len: int, block_size: int, dtype,
                    layers=None, kv_heads=None) -> None:
    """Refuse, with numbers, a KV budget that cannot hold even one maximum-length sequence."""
    spec = KVPoolSpec(layers or range(cfg.num_layers), kv_heads or range(cfg.num_kv_heads), 1, block_size,
                      cfg.head_dim, dtype)
    need = -(-max_model_len // block_size) * spec.bytes_per_block
    if gb * (1 << 30) < need:
        raise ValueError(f"{name}={gb:g} GB cannot hold one sequence of max_model_len={max_model_len} tokens: "
                         f"that needs {need / (1 << 30):.4f} GB ({spec.bytes_per_block} bytes per block of "
                         f"{block_size} tokens); raise {name} or lower engine.max_model_len")


def init_distributed() -> None:
    if dist.is_initialized():
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("WORLD_SIZE", "1"))   # DeepSpeed's CPU all-reduce needs it
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    atexit.register(cleanup_deepspeed_shm)


def _on_rank0_then_all(fn):
    """Run fn on rank 0 first (e.g. a one-time conversion), then on the others, which reuse its result."""
    out = fn() if dist.get_rank() == 0 else None
    dist.barrier()
    return out if dist.get_rank() == 0 else fn()


def _open_host_store(cfg, blocks, block_size, dtype) -> HostKVStore:
    box = [HostKVStore.new_path() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    store = _on_rank0_then_all(lambda: HostKVStore(cfg, blocks, block_size, dtype, box[0],
                                                   create=dist.get_rank() == 0))
    dist.barrier()
    if dist.get_rank() == 0:
        store.unlink()        # every rank has it mapped: the name can go, the memory stays until exit
    return store


def release_freed_host_memory() -> None:
    """AutoTP's temporary shard copies are freed once bound to the master copy, but glibc keeps freed heap
    pages; hand them back so the node's footprint is the master copy, not master + shards."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_engine(model: str, dtype="float32", parallel=None, max_model_len=2048, max_num_seqs=256,
                 max_num_batched_tokens=8192, block_size=16, kv_device_gb=1.0, kv_host_gb=2.0,
                 threshold=0.25, cache_dir=None, micro_batches=0, tokenizer=None, stash_async=None):
    """`stash_async`: prefill K/V go into the host store from a background thread (see stash.py); None:
    on accelerators (the copy overlaps compute on a side stream), not on CPUs, where the stash thread
    would take a core from the ranks' compute (measured no faster on 2 ranks over 2 cores)."""
    init_distributed()
    if stash_async is None:
        from deepspeed.accelerator import get_accelerator
        stash_async = get_accelerator().device_name() != "cpu"
    torch_dtype = parse_dtype(dtype)
    cache_dir = cache_dir or default_cache_dir()
    folder = _on_rank0_then_all(lambda: resolve_model_folder(model, cache_dir))
    cfg = load_model_config(folder)
    layouts = parallel if isinstance(parallel, StageLayouts) else \
        resolve_layouts(parallel, dist.get_world_size(), cfg)
    if layouts.prefill.dp > 1:
        raise NotImplementedError("data parallelism inside one engine is not supported yet; "
                                  "run one job per replica")
    max_model_len = min(max_model_len, cfg.max_position)
    master = MasterWeights(_on_rank0_then_all(lambda: prepare_master(folder, torch_dtype, cache_dir)))
    full = ModelRunner(build_hf_model(folder, master, torch_dtype))      # views: no weight bytes allocated
    prefill_ex = build_executor(layouts.prefill, folder, master, torch_dtype, cfg, full)
    decode_ex = prefill_ex if layouts.decode == layouts.prefill else \
        build_executor(layouts.decode, folder, master, torch_dtype, cfg, full)

    release_freed_host_memory()

    check_kv_budget(cfg, "kv.host_gb", kv_host_gb, max_model_len, block_size, torch_dtype)
    check_kv_budget(cfg, "kv.device_gb", kv_device_gb, max_model_len, block_size, torch_dtype,
                    decode_ex.layers, decode_ex.kv_heads)
    host_spec = KVPoolSpec.from_budget(cfg, int(kv_host_gb * (1 << 30)), block_size, torch_dtype)
    store = _open_host_store(cfg, host_spec.num_blocks, block_size, torch_dtype)
    dev_spec = KVPoolSpec.from_budget(cfg, int(kv_device_gb * (1 << 30)), block_size, torch_dtype,
                                      layers=decode_ex.layers, kv_heads=decode_ex.kv_heads)
    # every rank must agree on the block count: take the smallest
    n = torch.tensor([dev_spec.num_blocks])
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    dev_spec = KVPoolSpec(dev_spec.layers, dev_spec.kv_heads, int(n), block_size, cfg.head_dim, torch_dtype)
    pool = KVPool(dev_spec)
    sched = SeesawScheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, block_size),
                            TierConfig(host_spec.num_blocks, dev_spec.num_blocks, threshold, prefetch=True))
    if dist.get_rank() == 0:
        log.info("layouts: prefill %s -> decode %s; host store %d blocks (%.2f GB), device pool %d blocks "
                 "per rank", layouts.prefill.describe(), layouts.decode.describe(), host_spec.num_blocks,
                 store.nbytes / 1e9, dev_spec.num_blocks)
    detok = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None
    engine = DistributedEngine(sched, prefill_ex, decode_ex, store, pool, cfg.eos_token_ids, detok,
                               cfg.sliding_window, micro_batches, stash_async)
    engine.layouts, engine.model_folder, engine.config = layouts, folder, cfg
    engine.master, engine.master_path = master, master.path
    return engine
