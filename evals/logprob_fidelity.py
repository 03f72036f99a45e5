"""How far bf16 rollout logprobs sit from the trainer's: the per-token gap on the same sampled sequences.

    python evals/logprob_fidelity.py [--prompts 12] [--samples 4] [--max-tokens 32] [--out FILE]
    deepspeed --num_gpus 2 evals/logprob_fidelity.py --tp2      # the rollout engine as one TP2 engine

A bf16 model (embedded:smollm2) is the "trainer"; a RolloutEngine synced from it samples n completions per
chat prompt (temperature 1) with the sampled tokens' logprobs. The same token sequences are then scored by
the trainer's own full-sequence forward (transformers, right-padded batch) in bf16 and in fp32 (the fp32
checkpoint; bf16 is its rounding), and token by token with a KV cache in bf16 (what `generate` sees).
Each row compares two sources of log p(token) over the completion tokens, d = lp_a - lp_b:
mean |d|, p99 |d|, max |d| and mean exp(d) (the token probability ratio; 1 when unbiased). The last two
rows are transformers against itself: the floor any bf16 engine shares.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QUESTIONS = [
    "What is 3 + 5? Reply with only the number.",
    "What is 7 + 8? Reply with only the number.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Translate 'good morning, how are you?' into French.",
    "Give a short recipe for pancakes.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Write a Python function that reverses a string.",
    "Name four planets of the solar system.",
    "Why do cats purr?",
]


def gap_stats(a, b, mask) -> dict[str, float]:
    """a, b: [B, T-1] logprobs; mask: [B, T-1] completion tokens -> the gap's summary over those tokens."""
    import torch
    d = (a - b)[mask > 0].double()
    absd = d.abs()
    return {"tokens": int(d.numel()), "mean_abs": float(absd.mean()),
            "p99_abs": float(torch.quantile(absd, 0.99)), "max_abs": float(absd.max()),
            "ratio_mean": float(d.exp().mean())}


def incremental_logprobs(model, batch) -> "torch.Tensor":
    """[B, T-1] like `token_logprobs`, but each sequence alone, its prompt prefilled and then one token per
    forward through the KV cache (generate's path); 0 off the completion."""
    import torch
    out = torch.zeros_like(batch.old_logprobs)
    for i in range(batch.input_ids.shape[0]):
        positions = batch.target_mask[i].nonzero().flatten()          # t: position t predicts token t + 1
        if positions.numel() == 0:
            continue
        first, last = int(positions[0]), int(positions[-1])
        ids = batch.input_ids[i, :last + 1][None]
        with torch.no_grad():
            step = model(input_ids=ids[:, :first + 1], use_cache=True)
            cache = step.past_key_values
            logits = [step.logits[0, -1]]
            for t in range(first + 1, last + 1):
                step = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = step.past_key_values
                logits.append(step.logits[0, -1])
        lp = torch.log_softmax(torch.stack(logits).float(), dim=-1)
        targets = batch.input_ids[i, first + 1:last + 2]
        out[i, first:last + 1] = lp.gather(-1, targets[:, None]).squeeze(-1)
    return out


def _print_table(rows: list[dict]) -> None:
    print(f"{'comparison (a vs b)':<52}{'tokens':>7}{'mean|d|':>11}{'p99|d|':>11}{'max|d|':>11}{'E[e^d]':>10}")
    for r in rows:
        print(f"{r['comparison']:<52}{r['tokens']:>7}{r['mean_abs']:>11.2e}{r['p99_abs']:>11.2e}"
              f"{r['max_abs']:>11.2e}{r['ratio_mean']:>10.5f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="evals/logprob_fidelity.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--prompts", type=int, default=12, help=f"chat prompts, at most {len(QUESTIONS)}")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (n)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp2", action="store_true", help="the rollout engine as TP2 over the launch's 2 ranks")
    parser.add_argument("--no-incremental", action="store_true", help="skip the KV-cached transformers row")
    parser.add_argument("--out", default=None, help="JSON (default evals/results/logprob_fidelity-<1proc|TP2>.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(QUESTIONS) or args.samples < 1 or args.max_tokens < 1:
        parser.exit(2, f"{parser.prog}: error: --prompts must be 1-{len(QUESTIONS)}, --samples and --max-tokens "
                       ">= 1\n")

    import torch
    from transformers import AutoModelForCausalLM

    from seesaw_ds.engine.sampling_params import SamplingParams
    from seesaw_ds.models.loader import default_cache_dir, load_tokenizer, resolve_model_folder
    from seesaw_ds.rollout import RolloutEngine
    from seesaw_ds.rollout.grpo import build_batch, token_logprobs
    from seesaw_ds.rollout.loop import _chat_ids

    rank = 0
    if args.tp2:
        from seesaw_ds.distributed.builder import init_distributed
        init_distributed()
        rank = torch.distributed.get_rank()
        if torch.distributed.get_world_size() != 2:
            parser.exit(2, f"{parser.prog}: error: --tp2 needs a 2-rank launch (deepspeed --num_gpus 2)\n")
    folder = resolve_model_folder(args.model, default_cache_dir())
    tokenizer = load_tokenizer(folder)
    trainer = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    rollout = RolloutEngine(trainer, tokenizer, parallel={"tp": 2} if args.tp2 else None,
                            model=folder if args.tp2 else None, dtype=torch.bfloat16, kv_device_gb=0.1,
                            kv_host_gb=0.1, max_model_len=512)
    prompts = [{"prompt_token_ids": _chat_ids(tokenizer, q)} for q in QUESTIONS[:args.prompts]]
    params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, logprobs=0, seed=args.seed)
    with rollout.generating():
        outs = rollout.generate(prompts, params, n=args.samples)
    rollout.close()
    if rank != 0:
        return 0
    rows = [(o.prompt_token_ids, s) for o in outs for s in o.samples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = build_batch([p for p, _ in rows], [s.token_ids for _, s in rows], [s.logprobs for _, s in rows],
                        [0.0] * len(rows), pad_id=pad)
    with torch.no_grad():
        hf_bf16 = token_logprobs(trainer, batch.input_ids, batch.attention_mask)
        hf_inc = None if args.no_incremental else incremental_logprobs(trainer, batch)
        del trainer
        fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf_fp32 = token_logprobs(fp32, batch.input_ids, batch.attention_mask)
    engine_name = "rollout bf16 (TP2)" if args.tp2 else "rollout bf16"
    pairs = [(f"{engine_name} vs trainer bf16 forward", batch.old_logprobs, hf_bf16),
             (f"{engine_name} vs trainer fp32 forward", batch.old_logprobs, hf_fp32),
             ("transformers bf16 forward vs fp32 forward", hf_bf16, hf_fp32)]
    if hf_inc is not None:
        pairs.append(("transformers bf16 KV-cached vs bf16 forward", hf_inc, hf_bf16))
        pairs.append(("transformers bf16 KV-cached vs fp32 forward", hf_inc, hf_fp32))
    table = [{"comparison": name, **gap_stats(a, b, batch.target_mask)} for name, a, b in pairs]
    _print_table(table)
    out = args.out or os.path.join("evals", "results", f"logprob_fidelity-{'TP2' if args.tp2 else '1proc'}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"model": args.model, "rollout": "TP2" if args.tp2 else "1proc", "prompts": args.prompts,
                   "n": args.samples, "max_tokens": args.max_tokens, "seed": args.seed, "sequences": len(rows),
                   "rows": table}, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
