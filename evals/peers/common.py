"""What every engine runner shares: the workload file it reads and the result file it writes.

Standard library only: the vLLM runner imports this from its own virtualenv, which has no seesaw_ds.

Workload file: {"workloads": [{"name": str, "requests": [{"prompt_token_ids": [int], "output_len": int}]}]}
Result file:   {"engine": str, "dtype": str, "layout": str, "setup_s": float, "notes": [str],
                "results": [{"workload", "wall_s", "requests", "prompt_tokens", "output_tokens",
                             "generated_tokens", "extra": {...}, "output_digests": [str] (optional)}]}
`output_tokens` counts what was asked for; `generated_tokens` what the engine returned, capped per request at
its target (a static-batching engine may generate more: that work is its cost, not counted as output).
`output_digests` (one short hash of each request's output token ids, in request order) lets the report check
that two rows generated the same tokens without storing them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Callable, Sequence

WARMUP_REQUESTS = 4
WARMUP_TOKENS = 8


def read_workloads(path: str) -> list[dict]:
    with open(path) as f:
        workloads = json.load(f)["workloads"]
    for wl in workloads:
        if not wl["requests"]:
            raise ValueError(f"workload {wl['name']!r} has no requests")
    return workloads


def write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def counted_tokens(requests: Sequence[dict], generated_lengths: Sequence[int]) -> dict:
    if len(generated_lengths) != len(requests):
        raise ValueError(f"{len(generated_lengths)} outputs for {len(requests)} requests")
    return {
        "requests": len(requests),
        "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in requests),
        "output_tokens": sum(r["output_len"] for r in requests),
        "generated_tokens": sum(min(n, r["output_len"]) for n, r in zip(generated_lengths, requests)),
        "short_requests": sum(n < r["output_len"] for n, r in zip(generated_lengths, requests)),
    }


def token_digests(outputs: Sequence[Sequence[int]]) -> list[str]:
    """A 16-hex-digit hash per request of its output token ids: equal digests <=> equal tokens (in practice)."""
    return [hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16] for ids in outputs]


def warmup_requests(requests: Sequence[dict]) -> list[dict]:
    """A few prompts of the workload's lengths with a handful of output tokens; their tokens are reversed so
    that an engine with a prefix cache (vLLM) finds none of the timed prompts cached after the warm-up."""
    return [{"prompt_token_ids": list(reversed(r["prompt_token_ids"])), "output_len": min(WARMUP_TOKENS, r["output_len"])}
            for r in requests[:WARMUP_REQUESTS]]


def timed_workload(name: str, requests: list[dict],
                   generate: Callable[[list[dict]], tuple[list[int], dict]]) -> dict:
    """Warm up, then time one `generate(requests) -> (generated lengths, extra metrics)` call."""
    generate(warmup_requests(requests))
    start = time.perf_counter()
    lengths, extra = generate(requests)
    wall = time.perf_counter() - start
    return {"workload": name, "wall_s": wall, **counted_tokens(requests, lengths), "extra": extra}


def runner_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="safetensors model folder")
    parser.add_argument("--workloads", required=True, help="workload JSON file (see evals/peers/common.py)")
    parser.add_argument("--out", required=True, help="result JSON file to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1-process rows)")
    parser.add_argument("--layout", default="1proc", help="label recorded in the result")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser
