"""Cost of re-sharding: per stage switch, what moved and how fast, against a plain memory copy of the same
bytes; and the node's host memory against the model's bytes.

    deepspeed --num_gpus 2 evals/reshard.py            # PP2 -> TP2 on the embedded model
    deepspeed --num_gpus 2 evals/reshard.py --dtype float32 --requests 48 --host-gb 0.05

Prints a table on rank 0 and writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import torch  # noqa: E402


def pss_bytes() -> int:
    """Proportional set size: shared pages (master copy, host store) are split among the processes mapping them."""
    return psutil.Process().memory_full_info().pss


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    src = torch.empty(max(nbytes, 1) // 4 + 1, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--host-gb", type=float, default=0.1, help="host KV store (small: forces several switches)")
    ap.add_argument("--device-gb", type=float, default=0.5)
    ap.add_argument("--out", default="evals/results/reshard.json")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import deepspeed  # noqa: F401  (imports first: the baseline excludes library code)
    import torch.distributed as dist
    import transformers  # noqa: F401
    import seesaw_ds.distributed.builder  # noqa: F401
    from seesaw_ds import LLM, SamplingParams
    from seesaw_ds.distributed.builder import init_distributed
    init_distributed()          # the baseline holds the libraries and DeepSpeed's communication buffers
    baseline = pss_bytes()
    llm = LLM(args.model, dtype=args.dtype, parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}},
              kv_cache_gb=args.device_gb, kv_host_gb=args.host_gb, max_model_len=args.prompt_len + args.output_len + 16)
    eng = llm.engine
    model_bytes = eng.decode_executor.runner.hf_model and sum(
        t.numel() * t.element_size() for t in __import__("seesaw_ds.distributed.master", fromlist=["x"])
        .MasterWeights(eng.master_path).tensors.values())
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(100, 40000, (args.prompt_len,), generator=g).tolist()}
               for _ in range(args.requests)]
    peak = [pss_bytes()]
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    peak.append(pss_bytes())
    pool_bytes = eng.pool.tensor.numel() * eng.pool.tensor.element_size()
    mine = torch.tensor([max(peak), baseline, pool_bytes], dtype=torch.float64)
    dist.all_reduce(mine)                                   # node totals (one node here)
    st = eng.stats
    kv_copy = memcpy_seconds(st.kv_bytes_moved // max(1, st.decode_steps)) * st.decode_steps
    if dist.get_rank() != 0:
        return
    switches = st.switches
    rows = {
        "layouts": f"{llm.layouts.prefill.describe()} -> {llm.layouts.decode.describe()}",
        "wall_s": wall, "num_switches": len(switches),
        "switch_s_total": st.switch_s, "switch_s_mean": st.switch_s / max(1, len(switches)),
        "weight_bytes_per_switch": 0,
        "kv_bytes_moved": st.kv_bytes_moved, "kv_onboard_s": st.onboard_s,
        "kv_memcpy_s_same_bytes": kv_copy,
        "kv_onboard_vs_memcpy": st.onboard_s / kv_copy if kv_copy else None,
        "model_bytes": model_bytes, "host_store_bytes": eng.store.nbytes,
        "peak_pss_node": float(mine[0]), "baseline_pss_node (libraries, comm)": float(mine[1]),
        "device_pools_node": float(mine[2]),
        "engine_host_bytes (peak-baseline-pools-store)": float(mine[0] - mine[1] - mine[2]) - eng.store.nbytes,
        "engine_host_bytes / model_bytes": (float(mine[0] - mine[1] - mine[2]) - eng.store.nbytes) / model_bytes,
    }
    print(f"{'quantity':34s} value")
    for k, v in rows.items():
        print(f"{k:34s} {v:,.3f}" if isinstance(v, float) else f"{k:34s} {v}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows | {"switches": switches, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
