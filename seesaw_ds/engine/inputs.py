"""Turn a scheduled batch (CPU bookkeeping) into the tensors one forward needs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seesaw_ds.engine.scheduler import ScheduledBatch
from seesaw_ds.kv.attention import AttentionMetadata


@dataclass
class ModelInputs:
    input_ids: torch.Tensor        # [T] long, packed over sequences
    positions: torch.Tensor        # [T] long
    logits_indices: torch.Tensor   # [B] long: the row of each sequence's last token
    meta: AttentionMetadata


def _slots(block_table: list[int], positions: torch.Tensor, block_size: int) -> torch.Tensor:
    table = torch.tensor(block_table, dtype=torch.long)
    return table[positions // block_size] * block_size + positions % block_size


def build_inputs(batch: ScheduledBatch, block_size: int, sliding_window: int | None = None,
                 device: torch.device | str = "cpu") -> ModelInputs:
    if batch.is_prefill:
        ids, pos, slots, cu = [], [], [], [0]
        for seq in batch.seqs:
            n = seq.num_tokens
            p = torch.arange(n, dtype=torch.long)
            ids.append(torch.tensor(seq.all_token_ids, dtype=torch.long))
            pos.append(p)
            slots.append(_slots(seq.host_blocks if batch.to_host else seq.block_table, p, block_size))
            cu.append(cu[-1] + n)
        meta = AttentionMetadata(True, torch.cat(slots).to(device), cu, None, None)
        return ModelInputs(torch.cat(ids).to(device), torch.cat(pos).to(device),
                           torch.tensor(cu[1:], dtype=torch.long, device=device) - 1, meta)

    b = len(batch.seqs)
    max_blocks = max(len(s.block_table) for s in batch.seqs)
    tables = torch.zeros(b, max_blocks, dtype=torch.long)
    for i, seq in enumerate(batch.seqs):
        tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.long)
    context_lens = torch.tensor([s.num_tokens for s in batch.seqs], dtype=torch.long)
    positions = context_lens - 1
    slots = tables.gather(1, (positions // block_size)[:, None])[:, 0] * block_size + positions % block_size
    meta = AttentionMetadata(False, slots.to(device), [], tables.to(device), context_lens.to(device),
                             sliding_window=sliding_window)
    ids = torch.tensor([s.last_token_id for s in batch.seqs], dtype=torch.long, device=device)
    return ModelInputs(ids, positions.to(device), torch.arange(b, device=device), meta)


def micro_batch_groups(batch: ScheduledBatch, n: int) -> list[list[int]]:
    """Indices into `batch.seqs` of up to n micro-batches. Prefill: balanced prompt tokens (`balanced_groups`);
    decode: consecutive runs of equal size."""
    if batch.is_prefill:
        return balanced_groups([s.num_tokens for s in batch.seqs], n)
    n = max(1, min(n, len(batch.seqs)))
    edges = [-(-len(batch.seqs) * k // n) for k in range(n + 1)]          # ceil: the larger runs first
    return [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:])]


def balanced_groups(sizes: list[int], n: int) -> list[list[int]]:
    """Up to n groups of indices into `sizes` with near-equal sums: largest first, each to the lightest group
    (ties: the lower group); each group in source order, the groups lightest first. Why: a pipeline runs its
    micro-batches in lockstep (a stage hands over the next one only when the following stage takes it), so
    each tick lasts as long as the larger of the two micro-batches in flight. A pass then takes the sum of
    the micro-batches plus, at best, the largest one, which an order of increasing size reaches; unequal
    neighbours add their difference at every tick."""
    n = max(1, min(n, len(sizes)))
    groups: list[list[int]] = [[] for _ in range(n)]
    loads = [0] * n
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min(range(n), key=lambda g: (loads[g], g))
        groups[g].append(i)
        loads[g] += sizes[i]
    order = sorted((g for g in range(n) if groups[g]), key=lambda g: (loads[g], min(groups[g])))
    return [sorted(groups[g]) for g in order]
