"""Token selection from last-position logits. Greedy rows are batched; a sampled row draws from a generator
seeded by (request seed, token index), so its tokens depend only on its seed: not on what it was batched
with, not on preemption and recompute, and not on which rank happens to sample it."""
from __future__ import annotations

import torch

from seesaw_ds.engine.sequence import Sequence
from seesaw_ds.kv.native import row_max


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    # logits: [V] float32 (already divided by temperature)
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    return logits


def _step_generator(seq: Sequence) -> torch.Generator | None:
    if seq.params.seed is None:
        return None
    return torch.Generator().manual_seed((seq.params.seed * 1_000_003 + len(seq.output_token_ids)) % (1 << 63))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] int64: each row's first maximum (the ids `argmax` gives), by the native row scan where
    built: torch's `max` / `argmax` cost a decode step's LM head again on a CPU."""
    return row_max(logits)[1]


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits: [B, V] float32 -> one token id per sequence (+ logprobs where asked)."""
    tokens = greedy_tokens(logits)                                   # [B] greedy for every row first
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        tokens[i] = torch.multinomial(probs, 1, generator=_step_generator(seq))[0]
    token_list = tokens.tolist()
    logprobs: list[dict[int, float] | None] = [None] * len(seqs)
    if any(s.params.logprobs is not None for s in seqs):
        lp = torch.log_softmax(logits, dim=-1)
        for i, seq in enumerate(seqs):
            n = seq.params.logprobs
            if n is None:
                continue
            entry = {token_list[i]: float(lp[i, token_list[i]])}
            if n > 0:
                top = torch.topk(lp[i], n)
                entry.update({int(t): float(v) for t, v in zip(top.indices, top.values)})
            logprobs[i] = entry
    return token_list, logprobs
