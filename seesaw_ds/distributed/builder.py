"""Build the engine on this rank from an `EngineConfig`: layouts, master weights, one runtime per stage, the KV
tiers, the scheduler. One process and every layout go through the same steps:

    model folder -> ModelConfig -> layouts (resolve_layouts) -> placement on the ranks' nodes (placement.py)
    -> master copy (content-keyed, one per node) -> full model over views of it -> executors (AutoTP re-bound
    to the plan's slices) -> rectangles from the KV re-shard plan -> host tier (layout pairs that switch)
    -> device pool -> scheduler -> Engine

Whether the host tier is used is decided here, once: a static layout (both stages equal) keeps its KV in the
device pool and never switches; a pair that switches (e.g. PP prefill -> TP decode) stages every prompt's KV
in the node's host store, written in the prefill layout and read in the decode layout (one store per /dev/shm,
so every KV move must stay inside one: checked by placement.py at start-up).
"""
from __future__ import annotations

import atexit
import ctypes
import datetime
import logging
import os

import torch

from seesaw_ds.distributed.executors import build_executor, stage_collectives
from seesaw_ds.distributed.host_kv import open_host_store
from seesaw_ds.distributed.kv_moves import TierCopies
from seesaw_ds.distributed.master import MasterWeights, build_hf_model, prepare_master
from seesaw_ds.distributed.liveness import collective_timeout, stop_watching, watch_peers
from seesaw_ds.distributed.node import node_key, shm_domain, usable_cores
from seesaw_ds.distributed.pipe_decode import StagePipe
from seesaw_ds.distributed.pipe_executor import PipelineExecutor
from seesaw_ds.distributed.private_dirs import check_trusted_folders
from seesaw_ds.distributed.shm_buffers import cleanup_deepspeed_shm, cleanup_on_stop, shm_dir, sweep_stale_shm
from seesaw_ds.distributed.stash import KVStasher
from seesaw_ds.distributed.weight_views import WeightViews
from seesaw_ds.engine.comm import NullComm, TorchComm
from seesaw_ds.engine.config import EngineConfig
from seesaw_ds.engine.engine import Engine
from seesaw_ds.engine.in_flight import InFlightDecode
from seesaw_ds.engine.runtime import StageRuntime
from seesaw_ds.engine.scheduler import Scheduler, SchedulerConfig
from seesaw_ds.engine.seesaw_scheduler import SeesawScheduler, TierConfig
from seesaw_ds.engine.stats import EngineStats
from seesaw_ds.kv.pool import KVPool, KVPoolSpec
from seesaw_ds.models.config import ModelConfig, parse_dtype
from seesaw_ds.models.loader import default_cache_dir, load_model_config, load_tokenizer, resolve_model_folder
from seesaw_ds.models.runner import ModelRunner
from seesaw_ds.parallel.kv_plan import kv_ownership, kv_reshard_plan, moves_from, moves_into
from seesaw_ds.parallel.layout import Layout, StageLayouts, resolve_layouts
from seesaw_ds.parallel.micro_batches import prefill_window_tokens
from seesaw_ds.parallel.placement import RankPlace, check_placement
from seesaw_ds.parallel.weight_plan import whole_model_entries

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


def init_distributed() -> bool:
    """Initialise the default process group if needed; True if this call did it. Refuses extension folders
    other users can write, sweeps stale /dev/shm files, sets our collective timeout (liveness.py) and starts
    the peer watch (a dead peer ends this rank with one line; SIGTERM / SIGINT clean up /dev/shm)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("WORLD_SIZE", "1"))   # DeepSpeed's CPU all-reduce needs it
    check_trusted_folders()    # before DeepSpeed loads its compiled all-reduce op from there
    sweep_stale_shm()          # files of killed jobs (DeepSpeed would even reuse a buffer of the same name)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=collective_timeout())
    if os.environ["LOCAL_SIZE"] != os.environ.get("WORLD_SIZE", "1"):
        # several nodes: DeepSpeed's shared-memory all-reduce spans one node only and is not set up (its op
        # would crash); AutoTP's all-reduce then takes the process group's (gloo / NCCL) over the link
        from deepspeed.comm import comm as ds_comm
        ds_comm.cdb.shm_vector_kernel_level = 0
    atexit.register(cleanup_on_stop)      # this rank's buffers, and those of peers already gone
    watch_peers()              # a peer gone while this rank waits in a collective ends it with one line
    return True


def share_cores() -> None:
    """Torch's intra-op threads: this machine's cores shared out among the ranks it runs (LOCAL_SIZE), unless
    OMP_NUM_THREADS sets them. Each rank otherwise starts one thread per core, and oversubscribed cores make
    small matmuls 10-40x slower."""
    ranks = int(os.environ.get("LOCAL_SIZE") or os.environ.get("WORLD_SIZE") or 1)
    if ranks > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, usable_cores() // ranks))


def leave_distributed() -> None:
    """Undo init_distributed: stop the peer watch, destroy the process group and DeepSpeed's shared-memory
    buffers."""
    import torch.distributed as dist
    stop_watching()
    if dist.is_initialized():
        dist.destroy_process_group()
    cleanup_deepspeed_shm()


def release_freed_host_memory() -> None:
    """AutoTP's temporary shard copies are freed once bound to the master copy, but glibc keeps freed heap
    pages; hand them back so the node's footprint is the master copy, not master + shards."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def gather_places(comm) -> list[RankPlace]:
    """Every rank's node key and /dev/shm domain, in rank order (one all-gather at start-up)."""
    mine = RankPlace(node_key(), shm_domain(shm_dir()))
    return [RankPlace(*place) for place in comm.all_gather_object(tuple(mine))]


def _sampling_rank(layout: Layout) -> int:
    """The rank holding a stage's logits: the last pipeline stage's first TP rank (one replica per engine)."""
    return layout.global_rank(0, layout.pp - 1, 0)


def describe_engine(layouts: StageLayouts, host_blocks: int, host_bytes: int, pool_blocks: int) -> str:
    """The start-up line: layouts, and whether (and why) the host tier is used."""
    if layouts.is_static:
        tier = "host tier off (static layout: KV stays in the device pool)"
    else:
        tier = f"host tier on ({host_blocks} blocks, {host_bytes / 1e9:.2f} GB per node: prefill and decode " \
               f"layouts differ)"
    return f"engine: {layouts.describe()}; {tier}; device pool {pool_blocks} blocks per rank"


def build_engine(config: EngineConfig, *, comm=None, tokenizer=None, hf_model=None, announce=None) -> Engine:
    """`comm`: the replica's communicator (default: every launched rank, WORLD_SIZE > 1, else one
    process); `tokenizer`: default, the model folder's own (None for an in-memory model); `hf_model`: an in-memory transformers model to serve (one process; its tensors are the master);
    `announce(line)`: where rank 0 prints the start-up line (default: the `seesaw_ds` logger)."""
    on_close = []
    if comm is None:            # every launched rank (a process group this call makes, close() removes)
        launched = hf_model is None and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if launched and init_distributed():
            on_close.append(leave_distributed)
        import torch.distributed as dist
        comm = TorchComm() if dist.is_initialized() and hf_model is None else NullComm()
    try:
        return _build_engine(config, comm, tokenizer, hf_model, announce, on_close)
    except BaseException:
        _undo(on_close)         # a failed start-up: the store's mapping, the weights, a process group made here
        raise


def _undo(on_close) -> None:
    _settle_peers()
    for fn in reversed(on_close):
        try:
            fn()
        except Exception:  # noqa: BLE001 - the start-up error is the one to report
            log.debug("cleanup after a failed start-up failed", exc_info=True)


def _settle_peers(timeout_s: float = 30.0) -> None:
    """Before a failed start-up tears the process group down, wait (bounded) for the peers: a start-up error
    is usually the same on every rank, and a rank that destroys the group while a peer still reads from it
    turns the peer's clear error into a connection reset."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    except Exception:  # noqa: BLE001 - a peer that is gone or elsewhere: tear down anyway
        log.debug("peers did not reach the failed start-up's barrier", exc_info=True)


def _build_engine(config: EngineConfig, comm, tokenizer, hf_model, announce, on_close: list) -> Engine:
    dtype = parse_dtype(config.dtype) if hf_model is None else hf_model.dtype
    if hf_model is None:
        cache_dir = config.cache_dir or default_cache_dir()
        check_trusted_folders(cache_dir)
        folder = comm.on_rank0_then_all(lambda: resolve_model_folder(config.model, cache_dir))
        cfg = load_model_config(folder)
    else:
        folder, cfg = None, ModelConfig.from_hf(hf_model.config)
    layouts = resolve_layouts(config.parallel, comm.world_size, cfg)
    if layouts.prefill.dp > 1:
        raise NotImplementedError("data parallelism inside one engine is not supported yet; "
                                  "run one engine per replica")
    # before any weight loads: a TP group across nodes (unless allowed), a switching pair across /dev/shm's
    places = gather_places(comm)
    check_placement(layouts, places, config.allow_cross_node_tp, cfg)
    max_model_len = min(config.max_model_len, cfg.max_position)

    def rect(layout: Layout):
        return kv_ownership(cfg, layout)[layout.coords(comm.rank).local_rank]

    decode_rect = rect(layouts.decode)      # budgets are checked before any weight is loaded
    check_kv_budget(cfg, "kv.device_gb", config.kv_device_gb, max_model_len, config.block_size, dtype,
                    decode_rect.layers, decode_rect.heads)
    if not layouts.is_static:
        check_kv_budget(cfg, "kv.host_gb", config.kv_host_gb, max_model_len, config.block_size, dtype)
    if hf_model is None:
        weights = WeightViews(MasterWeights(comm.on_rank0_then_all(lambda: prepare_master(folder, dtype, cache_dir))))
        full = ModelRunner(build_hf_model(folder, weights.master, dtype))   # views: no weight bytes allocated
    else:
        weights = WeightViews(MasterWeights.from_tensors(
            {n: p.data for n, p in hf_model.named_parameters(remove_duplicate=False)}))
        full = ModelRunner(hf_model.eval())
    weights.bindings.append((full.hf_model, whole_model_entries(cfg)))      # already views of the master
    full.follow_weights(lambda: weights.content_key)
    on_close.append(weights.close)
    executors = {}
    for layout in (layouts.prefill, layouts.decode):
        if layout not in executors:
            executors[layout] = build_executor(layout, comm.rank, folder, weights, dtype, cfg, full)
    release_freed_host_memory()

    bs = config.block_size
    dev_spec = KVPoolSpec.from_budget(cfg, int(config.kv_device_gb * (1 << 30)), bs, dtype,
                                      layers=decode_rect.layers, kv_heads=decode_rect.heads)
    blocks = comm.all_reduce(dev_spec.num_blocks, op="min")     # every rank must agree on the block count
    pool = KVPool(KVPoolSpec(dev_spec.layers, dev_spec.kv_heads, blocks, bs, cfg.head_dim, dtype))
    stats = EngineStats(device_blocks=blocks)
    for executor in executors.values():
        if isinstance(executor, PipelineExecutor):
            executor.report_progress(stats)        # a long pipelined prefill pass shows its progress
    sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len, bs,
                                prefill_window_tokens=prefill_window_tokens(layouts.prefill.pp))
    if layouts.is_static:
        runtime = StageRuntime("static", layouts.decode, decode_rect, executors[layouts.decode], pool,
                               _sampling_rank(layouts.decode), micro_batches=config.micro_batches,
                               collectives=stage_collectives(layouts.decode))
        prefill = decode = runtime
        scheduler = Scheduler(sched_cfg, blocks)
        host_blocks = host_bytes = 0
    else:
        host_spec = KVPoolSpec.from_budget(cfg, int(config.kv_host_gb * (1 << 30)), bs, dtype)
        store = open_host_store(comm, places, cfg, host_spec.num_blocks, bs, dtype,
                                 f"kv.host_gb={config.kv_host_gb:g}")
        on_close.append(store.close)
        stash_async = config.stash_async
        if stash_async is None:       # a stash thread overlaps a device's compute; on CPUs it takes a core
            from deepspeed.accelerator import get_accelerator
            stash_async = get_accelerator().device_name() != "cpu"
        prefill_rect, local = rect(layouts.prefill), layouts.decode.coords(comm.rank).local_rank
        stasher = KVStasher(store, prefill_rect.heads, asynchronous=stash_async)
        prefill = StageRuntime("prefill", layouts.prefill, prefill_rect, executors[layouts.prefill], stasher,
                               _sampling_rank(layouts.prefill), stasher=stasher, micro_batches=config.micro_batches,
                               collectives=stage_collectives(layouts.prefill))
        decode = StageRuntime("decode", layouts.decode, decode_rect, executors[layouts.decode], pool,
                              _sampling_rank(layouts.decode), micro_batches=config.micro_batches,
                              collectives=stage_collectives(layouts.decode))
        scheduler = SeesawScheduler(sched_cfg, TierConfig(host_spec.num_blocks, blocks, config.kv_threshold,
                                                          prefetch=True))
        # decode's tier copies: the KV re-shard plan's moves into its rectangle (from the prefill layout's
        # rectangles, as stashed) and out of it (swap-outs, back into those rectangles)
        decode.copies = TierCopies(store, pool, stats,
                                   moves_into(kv_reshard_plan(cfg, layouts.prefill, layouts.decode), local),
                                   moves_from(kv_reshard_plan(cfg, layouts.decode, layouts.prefill), local))
        host_blocks, host_bytes = host_spec.num_blocks, store.nbytes
    on_close.append(lambda: setattr(pool, "tensor", torch.empty(0)))
    if comm.rank == 0:
        (announce or log.info)(describe_engine(layouts, host_blocks, host_bytes, blocks))
    if tokenizer is None and folder is not None:
        tokenizer = load_tokenizer(folder)
    eos = cfg.eos_token_ids or _tokenizer_eos(tokenizer)
    return Engine(scheduler, prefill, decode, comm, weights=weights, layouts=layouts, model_config=cfg,
                  model_folder=folder, stats=stats, eos_token_ids=eos, tokenizer=tokenizer,
                  sliding_window=cfg.sliding_window, on_close=on_close, in_flight=_in_flight(config, decode))


def _in_flight(config: EngineConfig, decode: StageRuntime) -> InFlightDecode | None:
    """Decode with micro-batches in flight across steps: a static pipeline of single-rank stages."""
    executor = decode.executor
    if not (config.decode_in_flight and decode.name == "static" and isinstance(executor, PipelineExecutor)
            and decode.layout.tp == 1 and not config.micro_batches):
        return None
    return InFlightDecode(StagePipe(executor), decode)


def _tokenizer_eos(tokenizer) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return () if eos is None else (int(eos),)
