"""n samples sharing one prefill vs the same samples as independent requests.

Each prompt is generated twice with the same sampling (temperature 1, seeded, EOS ignored): once as one
request with `SamplingParams(n=N)` (the prompt prefilled once, its KV blocks shared by the N samples) and
once as N independent requests seeded like the samples (`SamplingParams.for_sample(i)`), so both runs
produce the same tokens (checked). Reported per run: wall seconds, output tokens/s, prompt tokens
prefilled, peak KV blocks in the device pool (a shared block counted once).

    python evals/n_samples.py                                        # SmolLM2, one process
    python evals/n_samples.py --prompts 4 --prompt-len 512 --max-tokens 64 --n 8 --dtype float32
    deepspeed --num_gpus 2 evals/n_samples.py --parallel "PP2->TP2"  # the layout pair (host tier)

Prints a table and writes JSON to --out (default evals/results/n_samples-<layout>.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--parallel", default=None, help="layout, e.g. TP2 or PP2->TP2 (default: one process)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-device-gb", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # deepspeed launcher
    args = ap.parse_args(argv)
    for name in ("prompts", "prompt_len", "max_tokens", "n"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            sys.exit(2)
    return args


def _timed_generate(llm, prompts, params) -> dict:
    stats = llm.engine.stats
    stats.device_blocks_peak = 0
    prefill0, decode0, t0 = stats.prefill_tokens, stats.decode_tokens, time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [s.token_ids for o in outs for s in o.samples]
    out_tokens = sum(len(t) for t in tokens)
    return {"seconds": seconds, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / seconds,
            "prefill_tokens": stats.prefill_tokens - prefill0, "decode_tokens": stats.decode_tokens - decode0,
            "peak_kv_blocks": stats.device_blocks_peak, "tokens": tokens}


def main(argv=None) -> int:
    args = _args(argv)
    import torch
    from seesaw_ds import LLM, SamplingParams
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(1)
    settings = dict(dtype=args.dtype, kv_device_gb=args.kv_device_gb,
                    max_model_len=args.prompt_len + args.max_tokens + 16)
    if args.parallel:
        settings["parallel"] = args.parallel
    try:
        llm = LLM(args.model, **settings)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with llm:
        g = torch.Generator().manual_seed(args.seed)
        vocab = llm.config.vocab_size
        prompts = [torch.randint(100, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
        params = SamplingParams(n=args.n, temperature=1.0, seed=args.seed, max_tokens=args.max_tokens,
                                ignore_eos=True)
        _timed_generate(llm, prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))     # warm-up
        runs = {"shared": _timed_generate(llm, prompts, params),
                "independent": _timed_generate(llm, [p for p in prompts for _ in range(args.n)],
                                               [params.for_sample(i) for _ in prompts for i in range(args.n)])}
        layout = llm.layouts.describe() if hasattr(llm.layouts, "describe") else str(args.parallel or "1proc")
        if not llm.is_main:
            return 0
    same = runs["shared"].pop("tokens") == runs["independent"].pop("tokens")
    print(f"n={args.n} samples of {args.prompts} prompts x {args.prompt_len} tokens, {args.max_tokens} new tokens "
          f"each, {args.model} {args.dtype}, {layout}")
    print(f"{'run':<12} {'seconds':>8} {'out tok/s':>10} {'prefilled':>10} {'peak KV blocks':>15}")
    for name, r in runs.items():
        print(f"{name:<12} {r['seconds']:8.2f} {r['output_tokens_per_s']:10.1f} {r['prefill_tokens']:10d} "
              f"{r['peak_kv_blocks']:15d}")
    speedup = runs["independent"]["seconds"] / runs["shared"]["seconds"]
    blocks = runs["shared"]["peak_kv_blocks"] / max(1, runs["independent"]["peak_kv_blocks"])
    print(f"shared / independent: {speedup:.2f}x tokens/s, {blocks:.2f}x peak KV blocks; same tokens: {same}")
    out = Path(args.out or REPO / "evals" / "results" /
               f"n_samples-{(args.parallel or '1proc').replace('->', '-')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "local_rank"},
                               "layout": layout, "runs": runs, "same_tokens": same,
                               "speedup": speedup, "peak_blocks_ratio": blocks}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
