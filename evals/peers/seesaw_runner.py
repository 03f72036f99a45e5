"""The seesaw_ds engine row: `seesaw_ds.LLM` on the same model folder and token ids.

One process by default; the multi-rank layouts start this same file under a launcher
(`deepspeed --num_gpus 2 evals/peers/seesaw_runner.py ...`, see `seesaw_layout` in evals/throughput.py) and
pass the layout through `--llm-kwargs` (JSON keyword arguments for `LLM`). Only rank 0 writes the result,
with a digest of every request's output tokens (the report compares rows' tokens with them).

`evals/throughput.py --baseline REV` runs a copy of this file from a worktree of REV: it imports the
seesaw_ds beside it (its repo root goes first on sys.path), so keep it free of imports from evals/ other
than `common`, and pass only keyword arguments every revision's `LLM` knows.

Run: python evals/peers/seesaw_runner.py --model DIR --workloads wl.json --out res.json [--llm-kwargs '{}']
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import common  # noqa: E402


def output_token_ids(output) -> list[int]:
    """`.token_ids` of a seesaw_ds RequestOutput (or `.outputs[0].token_ids`, vLLM's shape)."""
    if hasattr(output, "token_ids"):
        return list(output.token_ids)
    return list(output.outputs[0].token_ids)


def engine_metrics(llm) -> dict:
    """Extra numbers the engine exposes (switch counts, stage times, ...) via `llm.metrics()`, if it has one."""
    metrics = getattr(llm, "metrics", None)
    if callable(metrics):
        return dict(metrics())
    return {}


def generate_greedy(llm, requests: list[dict]) -> tuple[list[list[int]], dict]:
    """Every request greedily to exactly its output length: (token ids per request, the engine metrics'
    change over the call)."""
    from seesaw_ds import SamplingParams
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r["output_len"], ignore_eos=True) for r in requests]
    before = engine_metrics(llm)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    after = engine_metrics(llm)
    delta = {k: v - before.get(k, 0) if isinstance(v, (int, float)) else v for k, v in after.items()}
    if "mean_decode_batch" in delta:     # a mean is not a difference: this call's own, as the engine counts it
        steps = delta.get("decode_steps", 0)
        delta["mean_decode_batch"] = delta.get("decode_tokens", 0) / steps if steps else 0.0
    return [output_token_ids(o) for o in outputs], delta


def run_seesaw(model_dir: str, workloads: list[dict], dtype: str, llm_kwargs: dict) -> tuple[float, list[dict]]:
    """(setup seconds, one result row per workload); every rank calls this, rank 0 reports it."""
    from seesaw_ds import LLM
    setup_start = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, **llm_kwargs)
    setup_s = time.perf_counter() - setup_start

    last = {}   # the token ids of the latest call: after `timed_workload`, those of the timed one

    def generate(requests):
        last["tokens"], delta = generate_greedy(llm, requests)
        return [len(ids) for ids in last["tokens"]], delta

    results = []
    for wl in workloads:
        row = common.timed_workload(wl["name"], wl["requests"], generate)
        row["output_digests"] = common.token_digests(last["tokens"])    # for the report's token-identity check
        results.append(row)
    return setup_s, results


def run_replicas(model_dir: str, workloads: list[dict], dtype: str, llm_kwargs: dict) -> tuple[float, list[dict]]:
    """Data-parallel replicas, as a job's `parallel: {dp: N}` runs them: every rank its own one-process engine
    over requests rank, rank + N, ...; each workload starts on every rank together (a barrier after the
    warm-up), and its row is the slowest rank's wall time over every rank's tokens."""
    from seesaw_ds import LLM
    from seesaw_ds.distributed.builder import init_distributed
    from seesaw_ds.engine.comm import TorchComm
    init_distributed()
    comm = TorchComm()
    rank, world = comm.rank, comm.world_size
    setup_start = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, distributed=False, **llm_kwargs)
    setup_s = time.perf_counter() - setup_start

    results = []
    for wl in workloads:
        mine = wl["requests"][rank::world]
        generate_greedy(llm, common.warmup_requests(mine))
        comm.barrier()
        start = time.perf_counter()
        tokens, extra = generate_greedy(llm, mine)
        wall = time.perf_counter() - start
        parts = comm.all_gather_object({"wall_s": wall, "tokens": tokens, "extra": extra})
        merged = [parts[i % world]["tokens"][i // world] for i in range(len(wl["requests"]))]
        row = {"workload": wl["name"], "wall_s": max(p["wall_s"] for p in parts),
               **common.counted_tokens(wl["requests"], [len(t) for t in merged]),
               "extra": {"replica_wall_s": [p["wall_s"] for p in parts], **parts[0]["extra"]}}
        row["output_digests"] = common.token_digests(merged)
        results.append(row)
    return setup_s, results


def main() -> None:
    parser = common.runner_arguments(__doc__.splitlines()[0])
    parser.add_argument("--llm-kwargs", default="{}", help="JSON keyword arguments for seesaw_ds.LLM")
    parser.add_argument("--replicas", action="store_true",
                        help="every rank its own engine over its share of the requests (data parallel)")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base = {"engine": "seesaw", "dtype": args.dtype, "layout": args.layout, "world_size": world, "results": []}
    try:
        import seesaw_ds  # noqa: F401
        from seesaw_ds import LLM, SamplingParams  # noqa: F401
    except ImportError as e:
        common.write_json_atomic(args.out, {**base, "skipped": f"seesaw_ds does not import: {e}"})
        return
    base["seesaw_ds"] = os.path.dirname(os.path.abspath(seesaw_ds.__file__))   # which tree ran (--baseline)
    print(f"[seesaw rank {rank}] seesaw_ds from {base['seesaw_ds']}", flush=True)
    import torch
    torch.set_num_threads(1 if world > 1 else args.threads)
    workloads = common.read_workloads(args.workloads)
    llm_kwargs = json.loads(args.llm_kwargs)
    longest = max(len(r["prompt_token_ids"]) + r["output_len"] for wl in workloads for r in wl["requests"])
    llm_kwargs.setdefault("max_model_len", max(2048, longest))
    run = run_replicas if args.replicas else run_seesaw
    setup_s, results = run(args.model, workloads, args.dtype, llm_kwargs)
    for row in results:
        print(f"[seesaw rank {rank}] {row['workload']}: {row['wall_s']:.1f} s", flush=True)
    if rank == 0:
        common.write_json_atomic(args.out, {**base, "setup_s": setup_s, "results": results,
                                            "llm_kwargs": llm_kwargs, "notes": []})


if __name__ == "__main__":
    main()
