"""Cost of re-sharding: per stage switch, the KV bytes the ended stage moved between the tiers and the time
those copies took (the stash and prefetch threads' included), against a plain memory copy (torch copy_) of
the same bytes; per copy kind the same; and the node's peak host memory, sampled from start to end over the
launcher's process tree, against the model's bytes and the KV store.

    deepspeed --num_gpus 2 evals/reshard.py            # PP2 -> TP2 on the embedded model
    deepspeed --num_gpus 2 evals/reshard.py --requests 8 --prompt-len 128 --output-len 8 --host-gb 0.01

Prints tables on rank 0 and writes JSON (`--out`). Ranks copy their own KV rectangles in parallel, so a
switch's copy time is its slowest rank's, compared with a copy of that rank's bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evals.memory_sampler import TreeMemorySampler, is_node_leader  # noqa: E402

KINDS = ("stash", "onboard", "prefetch", "swap_out")


def memcpy_seconds(nbytes: int, repeats: int = 5, footprint: int = 128 << 20) -> float:
    """Median of `repeats` plain tensor copies (torch copy_, one thread like the engine's copies) of
    `nbytes`, each between regions of a `footprint`-sized buffer pair that are not in the CPU caches."""
    import torch
    n = max(nbytes, 4) // 4
    slots = max(1, footprint // (4 * n))
    src = torch.ones(slots * n, dtype=torch.float32)
    dst = torch.zeros_like(src)              # touched: no page faults inside the timed copies
    times = []
    for i in range(repeats):                 # the earliest-written regions first: long evicted
        j = i % slots
        t = time.perf_counter()
        dst[j * n:(j + 1) * n].copy_(src[j * n:(j + 1) * n])
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def tensor_bytes(master, exclude: set[int], min_bytes: int = 1 << 20) -> dict[str, int]:
    """Large tensors alive in this process (by storage), split into views of the node's master copy (the
    memory-mapped file, held once per node in the page cache) and private memory (copies of this rank).
    `exclude`: storage addresses not to count (the KV pool, the host store)."""
    import gc
    import torch
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in master.tensors.values()
             if t.numel()]
    lo, hi = min(p for p, _ in spans), max(p + n for p, n in spans)
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.is_meta:
                continue
            storage = obj.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
        if nbytes >= min_bytes and ptr not in exclude:
            storages[ptr] = nbytes
    shared = sum(n for p, n in storages.items() if lo <= p < hi)
    return {"master_views": shared, "private": sum(storages.values()) - shared}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--host-gb", type=float, default=0.1, help="host KV store (small: forces several switches)")
    ap.add_argument("--device-gb", type=float, default=0.5, help="each rank's paged pool")
    ap.add_argument("--sample-interval", type=float, default=0.1, help="seconds between memory samples")
    ap.add_argument("--out", default="evals/results/reshard.json")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def switch_rows(per_rank: list[dict]) -> list[dict]:
    """One row per switch from every rank's records (all ranks switch in lockstep)."""
    rows = []
    for i, recs in enumerate(zip(*(r["switches"] for r in per_rank))):
        slowest = max(recs, key=lambda s: s["seconds"] + s["kv_copy_s"])
        biggest = max(s["kv_bytes_rank"] for s in recs)
        copy = memcpy_seconds(biggest)
        reshard_s = slowest["seconds"] + slowest["kv_copy_s"]
        rows.append({"index": i, "from": recs[0]["from"], "to": recs[0]["to"], "at_s": recs[0]["at_s"],
                     "weight_bytes": sum(s["weight_bytes"] for s in recs), "kv_bytes_node": recs[0]["kv_bytes"],
                     "kv_bytes_max_rank": biggest, "switch_s": slowest["seconds"],
                     "kv_copy_s": slowest["kv_copy_s"], "reshard_s": reshard_s, "memcpy_s": copy,
                     "vs_memcpy": reshard_s / copy if copy > 0 else None,
                     "host_occupancy": recs[0]["host_occupancy"]})
    return rows


def kind_rows(per_rank: list[dict]) -> list[dict]:
    """Per copy kind over the whole run: the rank that spent longest, against a copy of its bytes."""
    rows = []
    for kind in KINDS:
        ranks = [r["copies"][kind] for r in per_rank]
        nbytes, seconds = max(ranks, key=lambda bs: bs[1])
        copy = memcpy_seconds(nbytes) if nbytes else 0.0
        rows.append({"kind": kind, "bytes_node": sum(b for b, _ in ranks), "bytes_rank": nbytes, "seconds": seconds,
                     "memcpy_s": copy, "vs_memcpy": seconds / copy if copy > 0 else None})
    return rows


def print_tables(summary: dict, switches: list[dict], kinds: list[dict]) -> None:
    mb = 1e6
    print(f"\n{'quantity':42s} value")
    for k, v in summary.items():
        print(f"{k:42s} {v:,.3f}" if isinstance(v, float) else f"{k:42s} {v}")
    print(f"\n{'#':>2} {'switch':17s} {'at s':>6} {'weights MB':>10} {'KV MB node':>10} {'KV MB rank':>10} "
          f"{'switch ms':>9} {'copy ms':>8} {'total ms':>8} {'memcpy ms':>9} {'x memcpy':>8}")
    for r in switches:
        ratio = f"{r['vs_memcpy']:.2f}" if r["vs_memcpy"] is not None else "-"
        print(f"{r['index']:>2} {r['from'] + ' -> ' + r['to']:17s} {r['at_s']:6.1f} {r['weight_bytes'] / mb:10.2f} "
              f"{r['kv_bytes_node'] / mb:10.2f} {r['kv_bytes_max_rank'] / mb:10.2f} {1e3 * r['switch_s']:9.2f} "
              f"{1e3 * r['kv_copy_s']:8.2f} {1e3 * r['reshard_s']:8.2f} {1e3 * r['memcpy_s']:9.3f} {ratio:>8}")
    print(f"\n{'copy kind':10s} {'MB node':>9} {'MB rank':>9} {'copy ms':>9} {'memcpy ms':>9} {'x memcpy':>8}")
    for r in kinds:
        ratio = f"{r['vs_memcpy']:.2f}" if r["vs_memcpy"] is not None else "-"
        print(f"{r['kind']:10s} {r['bytes_node'] / mb:9.2f} {r['bytes_rank'] / mb:9.2f} {1e3 * r['seconds']:9.2f} "
              f"{1e3 * r['memcpy_s']:9.3f} {ratio:>8}")


def main(argv=None) -> None:
    args = parse_args(argv)
    sampler = TreeMemorySampler(args.sample_interval).start() if is_node_leader() else None   # before imports
    import torch
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401
    import torch.distributed as dist
    import transformers  # noqa: F401
    from seesaw_ds import LLM, SamplingParams
    from seesaw_ds.distributed.builder import init_distributed
    init_distributed()
    dist.barrier()              # every rank has its libraries and communication buffers: the baseline
    baseline = sampler.sample() if sampler else 0
    llm = LLM(args.model, dtype=args.dtype, parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}},
              kv_device_gb=args.device_gb, kv_host_gb=args.host_gb,
              max_model_len=args.prompt_len + args.output_len + 16)
    eng = llm.engine
    pool, store = eng.runtimes["decode"].kv, eng.runtimes["decode"].copies.store
    dist.barrier()
    if sampler:
        sampler.mark("engine built")
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(100, 40000, (args.prompt_len,), generator=g).tolist()}
               for _ in range(args.requests)]
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    st = eng.stats
    exclude = {pool.tensor.untyped_storage().data_ptr(), store.tensor.untyped_storage().data_ptr()}
    mine = {"switches": st.switches, "pool_bytes": pool.tensor.numel() * pool.tensor.element_size(),
            "tensors": tensor_bytes(eng.weights.master, exclude),
            "copies": {k: (getattr(st, f"{k}_bytes"), getattr(st, f"{k}_s")) for k in KINDS}}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    dist.barrier()
    if dist.get_rank() != 0:
        return
    sampler.mark("generated")
    sampler.stop()
    model_bytes = eng.weights.master.nbytes
    pools = sum(r["pool_bytes"] for r in per_rank)
    engine_bytes = sampler.peak - baseline - pools - store.nbytes
    steady = sampler.peak_between("engine built", "generated") - baseline - pools - store.nbytes
    switches, kinds = switch_rows(per_rank), kind_rows(per_rank)
    private = sum(r["tensors"]["private"] for r in per_rank)
    summary = {
        "layouts": f"{llm.layouts.prefill.describe()} -> {llm.layouts.decode.describe()}",
        "wall_s (generate)": wall, "num_switches": len(switches),
        "switch_s_mean (collective only)": st.switch_s / max(1, len(switches)),
        "reshard_s_mean (switch + KV copies)": sum(r["reshard_s"] for r in switches) / max(1, len(switches)),
        "reshard_vs_memcpy_mean": (sum(r["vs_memcpy"] or 0 for r in switches) / len(switches)) if switches else None,
        "swapped_out_seqs": st.swapped_out_seqs, "prefetch_stall_s": st.prefetch_stall_s,
        "model_bytes": model_bytes, "host_store_bytes": store.nbytes, "device_pools_node": pools,
        f"peak_node ({sampler.kind}, whole run)": sampler.peak, "peak_at_s": sampler.peak_at_s,
        "engine_built_at_s": sampler.marks["engine built"][0],
        "peak_node while generating": sampler.peak_between("engine built", "generated"),
        "baseline_node (libraries, comm)": baseline,
        "peak / model_bytes": sampler.peak / model_bytes,
        "engine_host (peak-baseline-pools-store)": engine_bytes,
        "engine_host / model_bytes (goal <= 1.25)": engine_bytes / model_bytes,
        "engine_host while generating / model_bytes": steady / model_bytes,
        "private tensors >= 1 MiB, all ranks": private,
        "weights on the node (master once + private) / model_bytes (goal <= 1.25)":
            (model_bytes + private) / model_bytes,
    }
    print_tables(summary, switches, kinds)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "switches": switches, "copy_kinds": kinds, "args": vars(args),
                   "memory_marks": sampler.marks, "memory_timeline": sampler.downsampled()}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
