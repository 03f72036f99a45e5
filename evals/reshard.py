"""Cost of re-sharding: per stage switch, the KV bytes the ended stage moved between the tiers and the time
those copies took (the stash and prefetch threads' included), against a plain memory copy (torch copy_) of
the same bytes; per copy kind the same; and the node's peak host memory, sampled from start to end over the
launcher's process tree, against the model's bytes and the KV store.

    deepspeed --num_gpus 2 evals/reshard.py            # PP2 -> TP2 on the embedded model
    deepspeed --num_gpus 2 evals/reshard.py --requests 8 --prompt-len 128 --output-len 8 --host-gb 0.01

Prints tables on rank 0 and writes JSON (`--out`). Ranks copy their own KV rectangles in parallel, so a
switch's copy time is its slowest rank's, compared with a plain copy of that rank's bytes timed on that rank
(both ranks at once). Each ratio comes twice: wall time, and the copying threads' CPU time against the plain
copy's CPU time. Their difference is time off the CPU (the copying thread preempted, or waiting for the GIL),
which a loaded machine inflates; CPU time beyond the plain copy's is the copies' own overhead (per-call Python
and view work, strided rather than flat copies), also shown per call.
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


def memcpy_seconds(nbytes: int, repeats: int = 5, footprint: int = 128 << 20) -> tuple[float, float]:
    """(wall, thread CPU) medians of `repeats` plain tensor copies (torch copy_, one thread like the engine's
    copies) of `nbytes`, each between regions of a `footprint`-sized buffer pair that are not in the CPU
    caches. Every rank runs it at once on its own bytes, as the ranks copy their rectangles at once."""
    import torch
    n = max(nbytes, 4) // 4
    slots = max(1, footprint // (4 * n))
    src = torch.ones(slots * n, dtype=torch.float32)
    dst = torch.zeros_like(src)              # touched: no page faults inside the timed copies
    walls, cpus = [], []
    for i in range(repeats):                 # the earliest-written regions first: long evicted
        j = i % slots
        t, c = time.perf_counter(), time.thread_time()
        dst[j * n:(j + 1) * n].copy_(src[j * n:(j + 1) * n])
        walls.append(time.perf_counter() - t)
        cpus.append(time.thread_time() - c)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


def copy_profile(runtimes: dict) -> dict[str, list]:
    """Per copy kind, [calls, seconds, CPU seconds of the copying thread] where the engine records them
    (the stasher and the tier copies); empty on a revision that does not."""
    profile = {}
    stasher, copies = runtimes["prefill"].stasher, runtimes["decode"].copies
    if stasher is not None and hasattr(stasher, "busy_cpu_s"):
        profile["stash"] = [stasher.calls, stasher.busy_s, stasher.busy_cpu_s]
    if copies is not None and hasattr(copies, "profile"):
        profile.update({k: list(v) for k, v in copies.profile.items()})
    return profile


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


STAGE_KINDS = {"prefill": ("stash",), "decode": ("onboard", "prefetch", "swap_out")}


def run_profiled(eng, prompts: list[dict], params) -> list[dict]:
    """Generate (the engine's step loop, as LLM.generate runs it) and return, per stage switch, the ended
    stage's copies as [calls, seconds, CPU seconds] per kind: the copy profile's growth in that stage's
    kinds since the stage began (a stage's own kinds never run in the other stage's steps)."""
    import torch
    switches, attributed = [], {}
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            eng.add_request(f"reshard-{i}", prompt["prompt_token_ids"], params)
        while eng.has_unfinished():
            seen = len(eng.stats.switches)
            eng.step()
            if len(eng.stats.switches) == seen:
                continue
            now, ended = copy_profile(eng.runtimes), eng.stats.switches[-1]["from"]
            row = {}
            for kind in STAGE_KINDS[ended]:
                cur, last = now.get(kind, [0, 0.0, 0.0]), attributed.get(kind, [0, 0.0, 0.0])
                row[kind] = [c - p for c, p in zip(cur, last)]
                attributed[kind] = cur
            switches.append(row)
    return switches


def switch_rows(per_rank: list[dict]) -> list[dict]:
    """One row per switch from every rank's records (all ranks switch in lockstep): the slowest rank's
    collective + KV copies against its own plain copy of the bytes it moved (timed on that rank)."""
    rows = []
    for i, recs in enumerate(zip(*(r["switches"] for r in per_rank))):
        rank = max(range(len(recs)), key=lambda k: recs[k]["seconds"] + recs[k]["kv_copy_s"])
        slowest = recs[rank]
        copy, copy_cpu = per_rank[rank]["memcpy_switch"][i]
        reshard_s = slowest["seconds"] + slowest["kv_copy_s"]
        rows.append({"index": i, "from": recs[0]["from"], "to": recs[0]["to"], "at_s": recs[0]["at_s"],
                     "weight_bytes": sum(s["weight_bytes"] for s in recs), "kv_bytes_node": recs[0]["kv_bytes"],
                     "kv_bytes_max_rank": max(s["kv_bytes_rank"] for s in recs), "slowest_rank": rank,
                     "kv_bytes_slowest": slowest["kv_bytes_rank"], "switch_s": slowest["seconds"],
                     "kv_copy_s": slowest["kv_copy_s"], "reshard_s": reshard_s, "memcpy_s": copy,
                     "memcpy_cpu_s": copy_cpu, "vs_memcpy": reshard_s / copy if copy > 0 else None,
                     "copies_vs_memcpy": slowest["kv_copy_s"] / copy if copy > 0 else None,
                     "host_occupancy": recs[0]["host_occupancy"]})
        prof = per_rank[rank]["switch_profiles"][i] if i < len(per_rank[rank]["switch_profiles"]) else {}
        if prof and any(v[0] for v in prof.values()):
            calls, wall, cpu = (sum(v[j] for v in prof.values()) for j in range(3))
            rows[-1].update({"calls": calls, "copy_cpu_s": cpu, "off_cpu_s": wall - cpu,
                             "cpu_vs_memcpy_cpu": cpu / copy_cpu if copy_cpu > 0 else None,
                             "by_kind": {k: {"calls": v[0], "seconds": v[1], "cpu_s": v[2]} for k, v in prof.items()}})
    return rows


def kind_rows(per_rank: list[dict]) -> list[dict]:
    """Per copy kind over the whole run: the rank that spent longest, against its own plain copy of its
    bytes, and what the time beyond that copy is made of: time off the CPU (the copying thread preempted or
    waiting for the GIL: seconds - CPU seconds) and CPU time beyond the plain copy's (per-call work: Python,
    view construction, strided rather than flat copies), per call."""
    rows = []
    for kind in KINDS:
        rank = max(range(len(per_rank)), key=lambda k: per_rank[k]["copies"][kind][1])
        nbytes, seconds = per_rank[rank]["copies"][kind]
        copy, copy_cpu = per_rank[rank]["memcpy_kind"][kind]
        row = {"kind": kind, "rank": rank, "bytes_node": sum(r["copies"][kind][0] for r in per_rank),
               "bytes_rank": nbytes, "seconds": seconds, "memcpy_s": copy, "memcpy_cpu_s": copy_cpu,
               "vs_memcpy": seconds / copy if copy > 0 else None}
        prof = per_rank[rank]["profile"].get(kind)
        if prof is not None and prof[0]:
            calls, wall, cpu = prof
            row.update({"calls": calls, "cpu_s": cpu, "cpu_vs_memcpy_cpu": cpu / copy_cpu if copy_cpu > 0 else None,
                        "beyond_memcpy_s": seconds - copy, "off_cpu_s": wall - cpu,
                        "cpu_beyond_memcpy_s": cpu - copy_cpu,
                        "cpu_beyond_per_call_us": 1e6 * (cpu - copy_cpu) / calls})
        rows.append(row)
    return rows


def print_tables(summary: dict, switches: list[dict], kinds: list[dict]) -> None:
    mb = 1e6
    print(f"\n{'quantity':42s} value")
    for k, v in summary.items():
        print(f"{k:42s} {v:,.3f}" if isinstance(v, float) else f"{k:42s} {v}")
    print(f"\n{'#':>2} {'switch':17s} {'at s':>6} {'KV MB node':>10} {'rank':>4} {'KV MB':>7} {'collect ms':>10} "
          f"{'copy ms':>8} {'total ms':>8} {'memcpy ms':>9} {'x memcpy':>8} {'copies x':>8} {'calls':>5} {'cpu ms':>7} "
          f"{'off-cpu ms':>10} {'cpu x':>6}")
    for r in switches:
        ratio = f"{r['vs_memcpy']:.2f}" if r["vs_memcpy"] is not None else "-"
        cratio = f"{r['copies_vs_memcpy']:.2f}" if r["copies_vs_memcpy"] is not None else "-"
        print(f"{r['index']:>2} {r['from'] + ' -> ' + r['to']:17s} {r['at_s']:6.1f} {r['kv_bytes_node'] / mb:10.2f} "
              f"{r['slowest_rank']:>4} {r['kv_bytes_slowest'] / mb:7.2f} {1e3 * r['switch_s']:10.2f} "
              f"{1e3 * r['kv_copy_s']:8.2f} {1e3 * r['reshard_s']:8.2f} {1e3 * r['memcpy_s']:9.3f} {ratio:>8} "
              f"{cratio:>8}" + (f" {r['calls']:5d} {1e3 * r['copy_cpu_s']:7.2f} {1e3 * r['off_cpu_s']:10.2f} "
                                f"{r['cpu_vs_memcpy_cpu']:6.2f}" if "calls" in r else ""))
    print("(per switch: the slowest rank; collect = the switch's all-reduce, which waits for the other rank; "
          "copy = the ended stage's KV copies; x memcpy = total / a plain copy of the rank's bytes on that rank; "
          "copies x = copy / that plain copy; cpu x = the copying threads' CPU time / the plain copy's CPU time)")
    print(f"\n{'copy kind':10s} {'MB node':>8} {'MB rank':>8} {'copy ms':>8} {'memcpy ms':>9} {'x memcpy':>8} "
          f"{'calls':>6} {'cpu ms':>7} {'cpu x':>6} {'off-cpu ms':>10} {'cpu>copy ms':>11} {'us/call':>7}")
    for r in kinds:
        ratio = f"{r['vs_memcpy']:.2f}" if r["vs_memcpy"] is not None else "-"
        line = (f"{r['kind']:10s} {r['bytes_node'] / mb:8.2f} {r['bytes_rank'] / mb:8.2f} {1e3 * r['seconds']:8.2f} "
                f"{1e3 * r['memcpy_s']:9.3f} {ratio:>8}")
        if "calls" in r:
            line += (f" {r['calls']:6d} {1e3 * r['cpu_s']:7.2f} {r['cpu_vs_memcpy_cpu'] or 0:6.2f} {1e3 * r['off_cpu_s']:10.2f} "
                     f"{1e3 * r['cpu_beyond_memcpy_s']:11.2f} {r['cpu_beyond_per_call_us']:7.1f}")
        print(line)
    print("(remaining time = copy - memcpy = off-cpu (copying thread preempted / waiting for the GIL) + "
          "cpu>copy (CPU time beyond a plain copy's: per-call Python and view work, strided copies))")


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
    switch_profiles = run_profiled(eng, prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True))
    wall = time.perf_counter() - t0
    st = eng.stats
    exclude = {pool.tensor.untyped_storage().data_ptr(), store.tensor.untyped_storage().data_ptr()}
    copies = {k: (getattr(st, f"{k}_bytes"), getattr(st, f"{k}_s")) for k in KINDS}
    dist.barrier()                   # both ranks time their plain copies at once, as they copied
    mine = {"switches": st.switches, "pool_bytes": pool.tensor.numel() * pool.tensor.element_size(),
            "tensors": tensor_bytes(eng.weights.master, exclude), "copies": copies,
            "profile": copy_profile(eng.runtimes), "switch_profiles": switch_profiles,
            "memcpy_switch": [memcpy_seconds(s["kv_bytes_rank"]) for s in st.switches],
            "memcpy_kind": {k: memcpy_seconds(b) if b else (0.0, 0.0) for k, (b, _) in copies.items()}}
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
        "copies_cpu_vs_memcpy_cpu_mean": (sum(r.get("cpu_vs_memcpy_cpu") or 0 for r in switches) / len(switches))
        if switches else None,
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
