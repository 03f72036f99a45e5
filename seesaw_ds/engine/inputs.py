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


def split_micro_batches(batch: ScheduledBatch, n: int) -> list[ScheduledBatch]:
    """Up to n micro-batches of consecutive sequences with balanced token counts."""
    n = max(1, min(n, len(batch.seqs)))
    total = sum(s.num_tokens if batch.is_prefill else 1 for s in batch.seqs)
    out, cur, acc = [], [], 0
    for i, s in enumerate(batch.seqs):
        cur.append(s)
        acc += s.num_tokens if batch.is_prefill else 1
        left_seqs, left_mbs = len(batch.seqs) - i - 1, n - len(out) - 1
        if left_mbs > 0 and (acc >= total * (len(out) + 1) / n or left_seqs == left_mbs):
            out.append(ScheduledBatch(batch.is_prefill, cur, batch.to_host))
            cur = []
    if cur:
        out.append(ScheduledBatch(batch.is_prefill, cur, batch.to_host))
    return out
