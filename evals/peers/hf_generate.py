"""Baseline engine: Hugging Face `generate` on padded static batches (left padding, greedy, forced lengths).

Requests are sorted by (output length, prompt length), longest first, and cut into batches of one size: each
batch decodes to its longest target (`min_new_tokens = max_new_tokens`, so EOS never stops it); tokens past a
request's own target are wasted work, reported as `extra.padded_decode_tokens`. The batch size is the best
of `--batch-sizes` on a short probe (prompts cut to `--probe-prompt` tokens, `--probe-new` new tokens) unless
`--batch-size` fixes it.

Run: python evals/peers/hf_generate.py --model DIR --workloads wl.json --out res.json [--dtype bfloat16]
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def padded_batch(prompts: list[list[int]], pad_id: int):
    """Left-padded ids and mask: ids, mask: [B, S_max]."""
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate_batch(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> int:
    """Greedy-decode exactly `new_tokens` for every row; returns the number of generated columns."""
    import torch
    ids, mask = padded_batch(prompts, pad_id)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad_id)
    return out.shape[1] - ids.shape[1]  # out: [B, S_max + new_tokens]


def generate_static(model, requests: list[dict], batch_size: int, pad_id: int) -> tuple[list[int], dict]:
    order = sorted(range(len(requests)), reverse=True,
                   key=lambda i: (requests[i]["output_len"], len(requests[i]["prompt_token_ids"])))
    lengths = [0] * len(requests)
    padded_decode = 0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        target = max(requests[i]["output_len"] for i in batch)
        made = generate_batch(model, [requests[i]["prompt_token_ids"] for i in batch], target, pad_id)
        for i in batch:
            lengths[i] = made
            padded_decode += made - requests[i]["output_len"]
    return lengths, {"batch_size": batch_size, "padded_decode_tokens": padded_decode}


def probe_batch_size(model, requests: list[dict], candidates: list[int], pad_id: int, prompt_cap: int,
                     new_tokens: int) -> tuple[int, dict]:
    """Tokens/s of one shortened batch per candidate size; the best size wins."""
    rates = {}
    for size in sorted({min(c, len(requests)) for c in candidates}):
        prompts = [r["prompt_token_ids"][:prompt_cap] for r in requests[:size]]
        generate_batch(model, prompts[:1], 2, pad_id)  # warm the kernels for this shape family
        start = time.perf_counter()
        made = generate_batch(model, prompts, new_tokens, pad_id)
        rates[size] = (sum(len(p) for p in prompts) + made * size) / (time.perf_counter() - start)
    return max(rates, key=rates.get), {str(k): round(v, 1) for k, v in rates.items()}


def main() -> None:
    parser = common.runner_arguments(__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="4,8,16,32", help="candidates for the probe")
    parser.add_argument("--batch-size", type=int, default=None, help="skip the probe and use this size")
    parser.add_argument("--probe-prompt", type=int, default=256)
    parser.add_argument("--probe-new", type=int, default=32)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    setup_start = time.perf_counter()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    setup_s = time.perf_counter() - setup_start

    results = []
    for wl in common.read_workloads(args.workloads):
        requests = wl["requests"]
        if args.batch_size:
            size, probe = args.batch_size, {}
        else:
            candidates = [int(c) for c in args.batch_sizes.split(",")]
            size, probe = probe_batch_size(model, requests, candidates, pad_id, args.probe_prompt, args.probe_new)

        def generate(reqs, size=size):
            return generate_static(model, reqs, size, pad_id)

        row = common.timed_workload(wl["name"], requests, generate)
        row["extra"]["probe_tokens_per_s"] = probe
        results.append(row)
        print(f"[hf] {wl['name']}: batch {size}, {row['wall_s']:.1f} s", flush=True)
    common.write_json_atomic(args.out, {"engine": "hf", "dtype": args.dtype, "layout": args.layout,
                                        "setup_s": setup_s, "threads": args.threads, "results": results,
                                        "notes": ["transformers generate, padded static batches"]})


if __name__ == "__main__":
    main()
