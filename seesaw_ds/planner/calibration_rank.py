"""One calibration rank: micro-benchmarks over gloo, results written as JSON. See `calibrate.py`.

NOTE: this file imports only the standard library, torch and (inside functions) deepspeed, transformers and
the standard-library-only `seesaw_ds.distributed.shm_buffers` and `seesaw_ds.distributed.node`.
`calibrate.measure` runs it by path in each spawned process (`runpy.run_path`), so a rank does not import the
whole seesaw_ds package.
NOTE: loops that communicate run the same number of iterations on every rank (agreed by an all-reduce
MAX); a loop that stopped on each rank's own clock would leave a send or a collective unmatched.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

RUN_NAME = "__seesaw_calibration_rank__"
MATMUL_N = 1024
COPY_BYTES = 64 * 2 ** 20
SMALL_BYTES = 1024
LARGE_BYTES = 4 * 2 ** 20
DECODE_ROWS = (1, 2, 4, 8, 16, 64)           # sequences of a decode step
DECODE_WEIGHT_BYTES = 256 * 2 ** 20       # streamed from memory, as a model's weights are
DECODE_SHAPE = (4096, 1024)               # [N, K] of each weight


def timed_alone(fn, seconds: float, min_iters: int = 2) -> float:
    """Seconds per call of `fn` (no communication), looping for about `seconds` after a warm-up call."""
    fn()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < seconds:
        fn()
        iters += 1
    return (time.perf_counter() - start) / iters


def matmul_rate(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """FLOP/s of `a @ b`."""
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / timed_alone(lambda: torch.mm(a, b), seconds)


def copy_rate(dst: torch.Tensor, src: torch.Tensor, seconds: float) -> float:
    """Bytes/s of `dst.copy_(src)`, counting the read and the write."""
    return 2 * src.numel() * src.element_size() / timed_alone(lambda: dst.copy_(src), seconds)


def timed_together(fn, seconds: float, group, min_iters: int = 2) -> float:
    """Seconds per call of a communicating `fn`; every member of `group` runs the same iteration count."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    probe = time.perf_counter() - start
    iters = torch.tensor([max(min_iters, int(seconds / max(probe, 1e-6)))])
    dist.all_reduce(iters, op=dist.ReduceOp.MAX, group=group)
    start = time.perf_counter()
    for _ in range(int(iters)):
        fn()
    return (time.perf_counter() - start) / int(iters)


def init_ranks(rank: int, world: int, init_file: str, port: int):
    """gloo process group through DeepSpeed when it imports, so that its inference all-reduce (what AutoTP
    calls: a shared-memory op on CPU ranks) can be measured. Returns that all-reduce, or None."""
    try:
        import deepspeed
        import deepspeed.comm as ds_comm
    except ImportError:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        return None
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                               verbose=False)
    return lambda t, group: ds_comm.inference_all_reduce(t, group=group)


def decoder_layer_overhead(seconds: float) -> float:
    """Seconds per call of a tiny transformers Llama decoder layer (one token, hidden 64): operator dispatch
    and module overhead with no real work. 0.0 when transformers is absent."""
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    except ImportError:
        return 0.0
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=128)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval().to(torch.bfloat16)
    h = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    rope = LlamaRotaryEmbedding(cfg)(h, torch.zeros(1, 1, dtype=torch.long))
    with torch.inference_mode():
        return timed_alone(lambda: layer(h, position_embeddings=rope), seconds, min_iters=20)


def decode_linear(weight: torch.Tensor):
    """x -> x @ weight.T as the lean decode step runs it: bf16 through the packed kernel where it is here
    (models/packed_linear.py), else `F.linear`."""
    if weight.dtype == torch.bfloat16:
        from seesaw_ds.models.packed_linear import PackedLinear, packable, packing_enabled
        holder = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = torch.nn.Parameter(weight, requires_grad=False)
        if packing_enabled() and packable([holder]):
            return PackedLinear([holder])
    return lambda x: torch.nn.functional.linear(x, weight)


def decode_linear_flops(seconds: float, dtype=torch.float32) -> dict:
    """{rows: FLOP/s} of decode's linears (`decode_linear`) with `rows` input rows over weights past the
    caches: their rate at a few rows is neither the large-matmul rate nor the copy rate."""
    n, k = DECODE_SHAPE
    size = torch.tensor([], dtype=dtype).element_size()
    linears = [decode_linear(torch.randn(n, k).to(dtype))
               for _ in range(max(1, DECODE_WEIGHT_BYTES // (n * k * size)))]
    out = {}
    for rows in DECODE_ROWS:
        x = torch.randn(rows, k).to(dtype)

        def run():
            for linear in linears:
                linear(x)
        out[str(rows)] = 2 * rows * n * k * len(linears) / timed_alone(run, seconds)
    return out


def matmul_rates(seconds: float, sync=lambda: None) -> dict:
    """{dtype: FLOP/s} of 1024^2 x 1024^2 matmuls in float32 and bfloat16; `sync()` before each."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(MATMUL_N, MATMUL_N).to(dtype), torch.randn(MATMUL_N, MATMUL_N).to(dtype)
        sync()
        out[str(dtype).replace("torch.", "")] = matmul_rate(a, b, seconds)
    return out


def decode_linear_table(seconds: float) -> dict:
    """{dtype: {rows: FLOP/s}} of `decode_linear_flops` in float32 and bfloat16."""
    return {"float32": decode_linear_flops(seconds), "bfloat16": decode_linear_flops(seconds, torch.bfloat16)}


def whole_machine(seconds: float) -> dict:
    """This rank's figures with one thread per usable core while every other rank waits: what one rank
    that folds the machine's ranks into itself would run at (its threads share one memory bus and no
    all-reduce)."""
    from seesaw_ds.distributed.node import usable_cores
    threads = usable_cores()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(COPY_BYTES // 4)
        return {"threads": threads, "allreduce": {}, "matmul_flops": matmul_rates(seconds),
                "copy_bandwidth": copy_rate(torch.empty_like(src), src, seconds),
                "decode_linear_flops": decode_linear_table(seconds),
                "layer_overhead": decoder_layer_overhead(seconds)}
    finally:
        torch.set_num_threads(1)


def measure_allreduce(fn, groups, rank: int, seconds: float, dtype=torch.float32) -> dict:
    """{degree: {latency, bandwidth}} of `fn(tensor, group)` over ranks 0..degree-1."""
    size = torch.tensor([], dtype=dtype).element_size()
    small, large = torch.ones(SMALL_BYTES // size, dtype=dtype), torch.ones(LARGE_BYTES // size, dtype=dtype)
    out = {}
    for degree, group in groups.items():
        if rank < degree:
            latency = timed_together(lambda: fn(small, group), seconds, group, min_iters=10)
            per_call = timed_together(lambda: fn(large, group), seconds, group)
            out[str(degree)] = {"latency": latency,
                                "bandwidth": LARGE_BYTES / max(per_call - latency, 0.5 * per_call)}
        dist.barrier()
    return out


def rank_main(rank: int, world: int, init_file: str, out_dir: str, spawned_at: float, seconds: float,
              port: int = 29600) -> None:
    started = time.perf_counter()
    torch.set_num_threads(1)
    inference_all_reduce = init_ranks(rank, world, init_file, port)
    result: dict = {"phase_seconds": {"spawn": started - spawned_at}}

    def phase_done(name):  # seconds since the rank started, to keep calibration cheap
        result["phase_seconds"][name] = time.perf_counter() - started

    result["matmul_flops"] = matmul_rates(seconds, dist.barrier)
    phase_done("matmul")
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    dist.barrier()
    result["copy_bandwidth"] = copy_rate(dst, src, seconds)
    phase_done("copy")
    dist.barrier()
    result["decode_linear_flops"] = decode_linear_table(seconds)
    if world > 1 and rank == 0:     # the same linears with every other rank idle (waiting in the barrier)
        result["decode_linear_flops_solo"] = decode_linear_table(seconds)
    dist.barrier()
    phase_done("decode_linear")

    if world > 1 and rank == 0:     # one rank with every core of the machine, the others idle
        result["whole_machine"] = whole_machine(seconds)
    dist.barrier()
    phase_done("whole_machine")

    dist.barrier()
    result["layer_overhead"] = decoder_layer_overhead(seconds)
    phase_done("layer_overhead")

    small, large = torch.ones(SMALL_BYTES // 4), torch.ones(LARGE_BYTES // 4)   # ping-pong buffers
    groups = {degree: dist.new_group(list(range(degree))) for degree in range(2, world + 1)}  # all ranks
    result["allreduce"] = measure_allreduce(lambda t, g: dist.all_reduce(t, group=g), groups, rank, seconds)
    if inference_all_reduce is not None:   # AutoTP's all-reduce, on the engine's bf16 activations
        result["tp_allreduce"] = measure_allreduce(inference_all_reduce, groups, rank, seconds, torch.bfloat16)
    phase_done("allreduce")

    if world > 1 and rank < 2:
        peer = 1 - rank

        def ping_pong(buf):
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)
        latency = timed_together(lambda: ping_pong(small), seconds, groups[2], min_iters=10) / 2
        one_way = timed_together(lambda: ping_pong(large), seconds, groups[2]) / 2
        result["p2p"] = {"latency": latency, "bandwidth": LARGE_BYTES / max(one_way - latency, 0.5 * one_way)}
    dist.barrier()
    phase_done("p2p")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    if inference_all_reduce is not None:
        from seesaw_ds.distributed.shm_buffers import cleanup_deepspeed_shm
        cleanup_deepspeed_shm()            # init_ranks set MASTER_PORT and RANK


if __name__ == RUN_NAME:  # started by calibrate.measure with RANK_ARGS in the globals
    rank_main(**RANK_ARGS)  # noqa: F821
