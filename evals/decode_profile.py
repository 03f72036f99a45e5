"""One decode step at the ShareGPT benchmark's mean batch, measured against its floor.

Builds the model runner the engine uses (one rank: the whole model; TP2: DeepSpeed AutoTP over 2 ranks),
fills a paged KV pool for `--batch` sequences with contexts drawn from `--context-min..--context-max`, and
times decode steps: the whole step, the decoder layers and the head. The floor of a piece is its FLOPs at
the matmul rate plus the weight and KV bytes it reads at the copy rate, both measured in the same run by
every rank at once with the rank's own threads (a one-thread rank gets one core's rate, not the node's);
the overhead of a layer call is its measured time minus its floor. `--ops` adds each op of a layer call
timed alone and the fixed cost of a call (evals/decode_ops.py); `--profile` adds torch.profiler's top
operators.

    python evals/decode_profile.py                       # one rank, both cores
    python evals/decode_profile.py --layout TP2          # relaunches itself: deepspeed --num_gpus 2
    SEESAW_DS_LEAN_DECODE=0 python evals/decode_profile.py   # transformers' layers (the older path)

Prints a table and writes JSON to evals/results/decode_profile-<layout>-<path>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.cli import OneLineParser  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COPY_RATE_BYTES = 256 * 2 ** 20


def arguments(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2")
    p.add_argument("--layout", default="1proc", choices=("1proc", "TP2"))
    p.add_argument("--batch", type=int, default=47)
    p.add_argument("--context-min", type=int, default=150)
    p.add_argument("--context-max", type=int, default=550)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--matmul-gflops", type=float, default=None,
                   help="bf16 matmul rate of one rank (default: measured in this run, 1024^3 matmuls)")
    p.add_argument("--copy-gbs", type=float, default=None,
                   help="memory copy rate of one rank, GB/s (default: measured in this run, 2 x 256 MB / copy time)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    p.add_argument("--ops", action="store_true", help="time each op of a layer call alone (evals/decode_ops.py)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one step")
    p.add_argument("--out", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # DeepSpeed's launcher
    args = p.parse_args(argv)
    if args.batch <= 0 or args.steps <= 0 or not 0 < args.context_min <= args.context_max:
        p.error("batch and steps must be positive, and 0 < context-min <= context-max")
    return args


def relaunch_under_deepspeed(argv: list[str]) -> int:
    """TP2 needs two ranks: run this same file under DeepSpeed's launcher (on a free port: the machine
    is shared)."""
    from seesaw_ds.distributed.node import free_port
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(Path(__file__).resolve()), *argv]
    return subprocess.call(cmd)


def build_runner(args, torch):
    """(runner, model config, tp world size, tp rank)."""
    from seesaw_ds.models.loader import load_model_config, resolve_model_folder
    from seesaw_ds.models.runner import ModelRunner
    from transformers import AutoModelForCausalLM
    folder = resolve_model_folder(args.model)
    cfg = load_model_config(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    if args.layout == "1proc":
        return ModelRunner(model), cfg, 1, 0
    import deepspeed
    import torch.distributed as dist
    from seesaw_ds.distributed.builder import init_distributed
    from seesaw_ds.distributed.executors import vocab_shard
    from seesaw_ds.models.vocab_head import rows_linear
    init_distributed()
    full_head = model.lm_head.weight.detach()                # [V, H], before AutoTP cuts the head
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.bfloat16,
                                      replace_with_kernel_inject=False)
    runner, rank = ModelRunner(engine.module), dist.get_rank()
    shard = vocab_shard(cfg, 2, rank, engine.module.lm_head)   # the vocabulary-parallel head, as the engine's
    runner.shard_vocab(rows_linear(full_head[shard.start:shard.stop]), shard)
    return runner, cfg, 2, rank


def decode_batch(args, cfg, kv_heads: int, torch):
    """A KV pool with random contents and the decode inputs of `batch` sequences (contexts incl. the new token)."""
    from seesaw_ds.kv.attention import AttentionMetadata
    from seesaw_ds.kv.pool import KVPool, KVPoolSpec
    gen = torch.Generator().manual_seed(0)
    bs = args.block_size
    ctx = torch.randint(args.context_min, args.context_max + 1, (args.batch,), generator=gen)
    blocks = [-(-int(n) // bs) for n in ctx]
    total = sum(blocks) + 8
    spec = KVPoolSpec(range(cfg.num_layers), range(kv_heads), total, bs, cfg.head_dim, torch.bfloat16)
    pool = KVPool(spec)
    pool.tensor.normal_(generator=gen)
    perm = torch.randperm(total, generator=gen).tolist()
    tables = torch.zeros(args.batch, max(blocks), dtype=torch.long)
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(perm[at:at + n])
        at += n
    positions = ctx - 1
    slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
    meta = AttentionMetadata(False, slots, [], tables, ctx.clone(), sliding_window=cfg.sliding_window)
    ids = torch.randint(0, cfg.vocab_size, (args.batch,), generator=gen)
    return pool, meta, ids, positions, ctx


def floors(cfg, ctx, tp: int, gflops: float, gbs: float) -> dict:
    """Floor milliseconds of one layer call and of the head on one rank (its 1/tp share of the work)."""
    b, d = len(ctx), cfg.head_dim
    layer_params = cfg.params_per_layer / tp
    kv_tokens = int(ctx.sum())
    layer_flops = 2 * b * layer_params + 4 * kv_tokens * (cfg.num_heads / tp) * d
    layer_bytes = 2 * layer_params + 2 * 2 * kv_tokens * (cfg.num_kv_heads / tp) * d
    head_flops = 2 * b * cfg.hidden_size * cfg.vocab_size / tp
    head_bytes = 2 * cfg.hidden_size * cfg.vocab_size / tp
    ms = lambda f, n: 1e3 * (f / (gflops * 1e9) + n / (gbs * 1e9))   # noqa: E731
    return {"layer_ms": ms(layer_flops, layer_bytes), "head_ms": ms(head_flops, head_bytes),
            "layer_gflop": layer_flops / 1e9, "layer_mb": layer_bytes / 1e6,
            "head_gflop": head_flops / 1e9, "head_mb": head_bytes / 1e6}


def split_floors(cfg, ctx, tp: int, gflops: float, gbs: float) -> dict:
    """The step's floor under the split TP really makes (weight_plan: AutoTP's head groups, MLP grain,
    vocabulary rows): each layer's attention and MLP are phases ended by an all-reduce, so a layer costs the
    busiest rank's attention plus the busiest rank's MLP. With KV heads that do not divide by tp (SmolLM2's
    3 on 2 ranks) this is above the even split's floor."""
    from seesaw_ds.parallel.weight_plan import grain_split_sizes, tp_head_ranges, vocab_rows
    b, d, h = len(ctx), cfg.head_dim, cfg.hidden_size
    kv_tokens = int(ctx.sum())
    ms = lambda f, n: 1e3 * (f / (gflops * 1e9) + n / (gbs * 1e9))   # noqa: E731
    attn, mlp, head = [], [], []
    inter = grain_split_sizes(cfg.intermediate_size, tp)
    for r, (q, kv) in enumerate(tp_head_ranges(cfg, tp)):
        params = h * d * (len(q) + 2 * len(kv)) + len(q) * d * h + h        # q, k, v, o and the input norm
        attn.append(ms(2 * b * params + 4 * kv_tokens * len(q) * d, 2 * params + 4 * kv_tokens * len(kv) * d))
        params = 3 * h * inter[r] + h                                        # gate, up, down and the norm
        mlp.append(ms(2 * b * params, 2 * params))
        rows = len(vocab_rows(cfg, tp)[r])
        head.append(ms(2 * b * h * rows, 2 * h * rows))
    layer = max(attn) + max(mlp)
    return {"layer_ms": layer, "head_ms": max(head), "step_ms": cfg.num_layers * layer + max(head),
            "attention_ms_per_rank": attn, "mlp_ms_per_rank": mlp, "head_ms_per_rank": head}


def measure_rates(torch, barrier, windows: int = 8, seconds: float = 0.25) -> tuple[float, float]:
    """(bf16 matmul GFLOP/s, copy GB/s) of this rank with its own threads while every rank measures too:
    the planner's calibration measures (1024^3 matmuls; a copy counted as read + write bytes, over a buffer
    past the last-level cache), each the best of `windows` short windows: a floor is what the cores can do,
    and the tile unit's rate here flips between two levels (~430 and ~1100 GFLOP/s) within seconds."""
    from seesaw_ds.planner.calibration_rank import MATMUL_N, copy_rate, matmul_rate
    a, b = torch.randn(MATMUL_N, MATMUL_N).bfloat16(), torch.randn(MATMUL_N, MATMUL_N).bfloat16()
    src = torch.ones(COPY_RATE_BYTES // 4)
    dst = torch.empty_like(src)
    barrier()
    gflops = max(matmul_rate(a, b, seconds) for _ in range(windows)) / 1e9
    barrier()
    return gflops, max(copy_rate(dst, src, seconds) for _ in range(windows)) / 1e9


def greedy_pick(logits):
    """The engine's greedy pick: of whole logits, or the slices' exchange under a vocabulary-parallel head."""
    from seesaw_ds.engine.sampler import greedy_tokens
    from seesaw_ds.models.vocab_head import ShardedLogits
    return logits.argmax() if isinstance(logits, ShardedLogits) else greedy_tokens(logits)


def time_steps(runner, pool, meta, ids, positions, args, torch, barrier):
    """Median ms of (step, decoder layers, head) over `steps` decode steps of the same batch, and the
    median CPU ms of a step (this process's CPU time: with one thread, the step's work even when other
    jobs share the cores)."""
    from seesaw_ds.kv.attention import AttentionMetadata
    layers = range(len(runner.layers))
    rows = torch.arange(len(ids))
    step, body, head, cpu = [], [], [], []
    for i in range(args.warmup + args.steps):
        m = AttentionMetadata(False, meta.slot_mapping, [], meta.block_tables, meta.context_lens,
                              sliding_window=meta.sliding_window)      # fresh per step, as the engine builds it
        barrier()
        with torch.inference_mode():
            c0, t0 = time.process_time(), time.perf_counter()
            h = runner.embed(ids)
            t1 = time.perf_counter()
            h = runner.run_layers(h, positions, layers, m, pool)
            t2 = time.perf_counter()
            greedy_pick(runner.head(h, rows))
            t3, c3 = time.perf_counter(), time.process_time()
        if i >= args.warmup:
            cpu.append(c3 - c0)
            step.append(t3 - t0)
            body.append(t2 - t1)
            head.append(t3 - t2)
    med = lambda xs: 1e3 * statistics.median(xs)   # noqa: E731
    return med(step), med(body), med(head), med(cpu)


def profile_one_step(runner, pool, meta, ids, positions, torch) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.forward(ids, positions, meta, pool, torch.arange(len(ids)))
    rows = []
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:18]:
        rows.append({"op": ev.key, "calls": ev.count, "self_ms": ev.self_cpu_time_total / 1e3})
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = arguments(argv)
    if args.layout == "TP2" and "WORLD_SIZE" not in os.environ:
        return relaunch_under_deepspeed(argv)
    import torch
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or max(1, cores // world))
    from seesaw_ds.models.decode_path import lean_decode_enabled
    runner, cfg, tp, rank = build_runner(args, torch)
    kv_heads = len(runner.layers[0].self_attn.k_proj.weight) // cfg.head_dim
    pool, meta, ids, positions, ctx = decode_batch(args, cfg, kv_heads, torch)
    if tp > 1:
        import torch.distributed as dist
        barrier = dist.barrier
    else:
        barrier = lambda: None   # noqa: E731
    gflops, gbs = measure_rates(torch, barrier)
    gflops, gbs = args.matmul_gflops or gflops, args.copy_gbs or gbs
    fl = floors(cfg, ctx, tp, gflops, gbs)
    step_ms, body_ms, head_ms, cpu_ms = time_steps(runner, pool, meta, ids, positions, args, torch, barrier)
    ops = {}
    if args.ops:
        from evals.decode_ops import layer_breakdown
        reduce = None
        if tp > 1:
            from deepspeed.comm import inference_all_reduce
            reduce = inference_all_reduce
        ops = layer_breakdown(runner, pool, meta, ids, positions, barrier, all_reduce=reduce)
        if tp == 1:
            from evals.decode_ops import fixed_cost_per_call
            ops.update({f"fixed cost, {k}": v for k, v in fixed_cost_per_call(runner.hf_model.config).items()})
    top = profile_one_step(runner, pool, meta, ids, positions, torch) if args.profile else []
    layer_ms = body_ms / cfg.num_layers
    floor_step = cfg.num_layers * fl["layer_ms"] + fl["head_ms"]
    split = split_floors(cfg, ctx, tp, gflops, gbs)
    path = "lean" if lean_decode_enabled() else "hf"
    result = {
        "layout": args.layout, "path": path, "rank": rank, "threads": torch.get_num_threads(),
        "batch": args.batch, "mean_context": float(ctx.float().mean()), "layers": cfg.num_layers,
        "matmul_gflops": gflops, "copy_gbs": gbs, "load_avg": os.getloadavg()[0],
        "layer_call_ms": layer_ms, "layer_floor_ms": fl["layer_ms"], "layer_overhead_ms": layer_ms - fl["layer_ms"],
        "head_ms": head_ms, "head_floor_ms": fl["head_ms"],
        "step_ms": step_ms, "step_cpu_ms": cpu_ms, "step_floor_ms": floor_step, "step_over_floor": step_ms / floor_step,
        "floor_detail": fl, "split_floor": split, "step_over_split_floor": step_ms / split["step_ms"],
        "layer_ops_cpu_ms": ops, "profile_top_ops": top,
    }
    if rank == 0:
        print(f"decode step, {args.layout} ({path} path), batch {args.batch}, mean context "
              f"{result['mean_context']:.0f}, {torch.get_num_threads()} thread(s)/rank, floor at "
              f"{gflops:.0f} GFLOP/s + {gbs:.1f} GB/s per rank, load {result['load_avg']:.2f}")
        print(f"{'':22}{'measured ms':>12}{'floor ms':>10}{'overhead ms':>13}")
        print(f"{'per layer call':22}{layer_ms:12.3f}{fl['layer_ms']:10.3f}{layer_ms - fl['layer_ms']:13.3f}")
        print(f"{'head + greedy pick':22}{head_ms:12.2f}{fl['head_ms']:10.2f}{head_ms - fl['head_ms']:13.2f}")
        print(f"{'per step':22}{step_ms:12.2f}{floor_step:10.2f}{step_ms - floor_step:13.2f}"
              f"   ({step_ms / floor_step:.2f}x floor)")
        if tp > 1:
            print(f"{'per step, split floor':22}{'':12}{split['step_ms']:10.2f}{step_ms - split['step_ms']:13.2f}"
                  f"   ({step_ms / split['step_ms']:.2f}x the floor of the busiest rank per phase, as TP splits)")
        print(f"{'per step, CPU time':22}{cpu_ms:12.2f}{'':23}   ({cpu_ms / floor_step:.2f}x floor; "
              f"1 thread/rank: the work without waiting for other jobs)")
        if ops:
            print("one layer call, CPU ms per op (alone), and the whole call through each path:")
            for name, value in ops.items():
                print(f"  {name:28}{value:8.3f}")
        for row in top:
            print(f"  {row['op'][:48]:48}{row['calls']:6d}{row['self_ms']:10.2f} ms")
        out = Path(args.out) if args.out else RESULTS / f"decode_profile-{args.layout}-{path}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    if tp > 1:
        from seesaw_ds.distributed.builder import leave_distributed
        leave_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
