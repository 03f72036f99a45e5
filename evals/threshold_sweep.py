"""How `kv.threshold` (the host-store fill fraction at which decode hands back to prefill) trades stage
switches against decode batch size, measured side by side on one engine.

    deepspeed --num_gpus 2 evals/threshold_sweep.py                      # PP2 -> TP2, ShareGPT, 4 thresholds
    deepspeed --num_gpus 2 evals/threshold_sweep.py --workload arxiv --host-gb 0.3 --thresholds 0,0.5

The host store is kept smaller than the workload's prompt KV so that the run needs several prefill ->
decode cycles. Every threshold runs the same requests on the same engine (the scheduler's tier settings are
swapped between runs), greedy with EOS ignored, after one warm-up. Prints a table on rank 0, writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--workload", default="sharegpt", help="a workload of evals/workloads.py")
    ap.add_argument("--scale", type=float, default=0.5, help="multiply the workload's request count")
    ap.add_argument("--host-gb", type=float, default=0.25, help="host KV store (smaller than the workload)")
    ap.add_argument("--device-gb", type=float, default=1.0, help="each rank's paged pool")
    ap.add_argument("--thresholds", default="0,0.25,0.5,0.75")
    ap.add_argument("--out", default="evals/results/threshold_sweep.json")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_once(llm, requests: list, params_cls) -> tuple[float, dict]:
    before = dict(llm.metrics())
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in requests],
                 [params_cls(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in requests],
                 use_tqdm=False)
    wall = time.perf_counter() - start
    after = llm.metrics()
    return wall, {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 2)
    from evals.workloads import build_workloads
    from seesaw_ds import LLM, SamplingParams
    from seesaw_ds.data import total_tokens
    llm = LLM(args.model, dtype=args.dtype, parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}},
              kv_device_gb=args.device_gb, kv_host_gb=args.host_gb, max_model_len=2048)
    vocab = llm.config.vocab_size
    requests = build_workloads([args.workload], llm.tokenizer, vocab, args.scale)[args.workload]
    prompt_tokens, output_tokens = total_tokens(requests)
    sched = llm.engine.scheduler
    run_once(llm, requests[:4], SamplingParams)                          # warm-up
    rows = []
    for threshold in [float(t) for t in args.thresholds.split(",")]:
        sched.tiers = dataclasses.replace(sched.tiers, threshold=threshold)
        wall, d = run_once(llm, requests, SamplingParams)
        steps = d.get("decode_steps", 0)
        rows.append({"threshold": threshold, "wall_s": wall, "tokens_per_s": (prompt_tokens + output_tokens) / wall,
                     "num_switches": d.get("num_switches", 0), "prefill_s": d.get("prefill_s", 0.0),
                     "decode_s": d.get("decode_s", 0.0), "switch_s": d.get("switch_s", 0.0),
                     "prefetch_stall_s": d.get("prefetch_stall_s", 0.0),
                     "mean_decode_batch": d.get("decode_tokens", 0) / steps if steps else 0.0})
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    store = llm.engine.runtimes["decode"].copies.store
    host_bytes = store.nbytes
    kv_per_token = host_bytes / (store.num_blocks * store.block_size)
    print(f"\n{args.workload} x{len(requests)}: {prompt_tokens} prompt + {output_tokens} output tokens; prompt KV "
          f"{prompt_tokens * kv_per_token / 1e9:.2f} GB vs host store {host_bytes / 1e9:.2f} GB")
    print(f"{'threshold':>9} {'tok/s':>7} {'wall s':>7} {'switches':>8} {'prefill s':>9} {'decode s':>8} "
          f"{'stall s':>7} {'mean batch':>10}")
    for r in rows:
        print(f"{r['threshold']:>9.2f} {r['tokens_per_s']:>7.0f} {r['wall_s']:>7.1f} {r['num_switches']:>8} "
              f"{r['prefill_s']:>9.1f} {r['decode_s']:>8.1f} {r['prefetch_stall_s']:>7.2f} "
              f"{r['mean_decode_batch']:>10.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
                   "host_store_bytes": host_bytes, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
