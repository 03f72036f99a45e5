"""n samples of one request sharing one prefill.

    add_request(n)   -> sample 0 is the sequence the scheduler sees; samples 1..n-1 wait in its `forks`
    prefill          -> the prompt is computed (and, with a host tier, stashed) once; all n first tokens are
                        drawn from its last-position logits, each sample with its own derived seed
    first decode     -> `fork_samples` (called by the scheduler before it grows the running sequences): each
                        fork takes a reference to the prompt's full blocks and one block of its own; when the
                        prompt ends inside a block, that partly filled block is copied into it (`copy_blocks`,
                        run by the engine after the step's onboarding, before the forward)
    finish / preempt -> `allocator.free` drops references: a shared block is freed by its last holder

Only the prompt's full blocks are ever shared: the block holding position len(prompt) is each sample's own,
so no sample writes a block another reads. Sample 0 may decode further before a fork finds a free block:
the prompt positions of its blocks never change, so a later copy is still exact. Forks wait rather than
force a preemption: a fork is made only while the pool keeps one free block for every running sequence that
crosses a block boundary this step, and while the batch is below `max_num_seqs`. With a host tier (a layout
pair), sample 0 is stashed and loaded alone, so the host store holds the prompt once, and the samples fork
in the decode stage once it is on the device. Forks still waiting when sample 0 finishes are recomputed
(`release_orphans`: back to waiting with their first token), which only costs time.
"""
from __future__ import annotations

import torch

from seesaw_ds.engine.sequence import Sequence, SequenceStatus


def make_samples(request_id: str, prompt: list[int], params, eos_token_ids, max_model_len: int) -> list[Sequence]:
    """The n sequences of one request: sample 0 carries the others in its `forks`."""
    samples = [Sequence(request_id, prompt, params.for_sample(i), eos_token_ids, max_model_len, sample_index=i)
               for i in range(params.n)]
    samples[0].forks = samples[1:]
    return samples


def first_token_forks(seqs: list[Sequence]) -> list[tuple[int, Sequence]]:
    """(row of the batch, fork) for every fork of a prefilled sequence that has no token yet: these draw their
    first token from that row's logits."""
    return [(i, f) for i, s in enumerate(seqs) for f in s.forks if not f.output_token_ids]


def fork_samples(scheduler) -> list[tuple[int, int]]:
    """Fork the waiting samples of running sequences into the running list, right after their source.
    Returns (source, destination) device block copies to run before this step's forward."""
    cfg, alloc = scheduler.config, scheduler.allocator
    if not any(s.forks for s in scheduler.running):
        return []
    bs, limit = cfg.block_size, min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
    growth = sum(len(s.block_table) < s.blocks_needed(bs) for s in scheduler.running)
    copies: list[tuple[int, int]] = []
    running: list[Sequence] = []
    count = len(scheduler.running)
    for seq in scheduler.running:
        running.append(seq)
        while seq.forks and count < limit and alloc.num_free > growth:
            fork = seq.forks.pop(0)
            prompt_len = len(seq.prompt_token_ids)
            full = seq.block_table[:prompt_len // bs]
            alloc.share(full)
            own = alloc.allocate(1)[0]
            if prompt_len % bs:
                copies.append((seq.block_table[prompt_len // bs], own))
            fork.block_table = full + [own]
            fork.status = SequenceStatus.RUNNING
            running.append(fork)
            count += 1
    scheduler.running[:] = running
    return copies


def release_orphans(scheduler, finished: list[Sequence]) -> None:
    """Forks of a sequence that finished before they could fork recompute their prompt (front of waiting)."""
    for seq in finished:
        for fork in reversed(seq.forks):
            if not fork.is_finished:
                fork.status = SequenceStatus.WAITING
                scheduler.waiting.appendleft(fork)
        seq.forks = []


def copy_blocks(pool, copies: list[tuple[int, int]]) -> None:
    """Copy whole KV blocks inside this rank's paged pool (every layer and KV head it holds)."""
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=pool.tensor.device)
    dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=pool.tensor.device)
    pool.tensor.index_copy_(2, dst, pool.tensor.index_select(2, src))
