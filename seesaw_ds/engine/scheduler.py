"""Decides, each step, which sequences to prefill or decode. Pure bookkeeping: no tensors.

Policy (one stage per step, prefill first, as in continuous batching without chunking):
  * prefill: admit waiting sequences FIFO while the prefill budget, `max_num_seqs` and free KV blocks allow;
    the first one is admitted even over the budget (no prompt is ever starved by the budget). The prefill
    budget is `max_num_batched_tokens`, raised to `prefill_window_tokens` where the prefill stage is a
    pipeline that streams a window of many micro-batches per pass (pipe_executor.py);
  * otherwise decode every running sequence, giving each the block its next token needs; when the pool is
    full the most recently admitted sequence is preempted (blocks freed, recomputed later), never dropped.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from seesaw_ds.engine.sample_groups import fork_samples
from seesaw_ds.engine.sequence import Sequence, SequenceStatus
from seesaw_ds.kv.allocator import BlockAllocator


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    block_size: int = 16
    prefill_window_tokens: int = 0     # > max_num_batched_tokens: a prefill step's larger budget (a stream)

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SchedulerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.prefill_window_tokens < 0:
            raise ValueError(f"SchedulerConfig.prefill_window_tokens must be >= 0, got {self.prefill_window_tokens}")

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens one prefill step admits (the first prompt aside)."""
        return max(self.max_num_batched_tokens, self.prefill_window_tokens)


@dataclass
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]
    to_host: bool = False        # prefill writes KV to the host store (slots index host blocks)
    # decode: (host blocks, device blocks) to copy host -> device before the forward
    onboard: list[tuple[list[int], list[int]]] | None = None
    # decode: copies to start in the background now; they land by the next step (two-phase protocol)
    prefetch: list[tuple[list[int], list[int]]] | None = None
    wait_prefetch: bool = False  # the previous step's prefetches must have landed before this forward
    # decode: (device blocks, host blocks) to copy device -> host first, before any onboarding or forward:
    # swapped-out runners (their device blocks are already free for this step's loads and growth)
    swap_out: list[tuple[list[int], list[int]]] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs) if self.is_prefill else len(self.seqs)


class RequestRejected(ValueError):
    pass


class Scheduler:
    has_host_tier = False

    def __init__(self, config: SchedulerConfig, num_blocks: int):
        self.config = config
        self.allocator = BlockAllocator(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.fork_copies: list[tuple[int, int]] = []   # device block copies before the forward (sample_groups)

    # ---- admission -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self._admit(seq, (("pool", self.allocator.num_blocks),))
        self.waiting.append(seq)

    def _admit(self, seq: Sequence, tiers: tuple[tuple[str, int], ...]) -> None:
        """Reject, with numbers, a request that could never run: the loop must never wait on it forever."""
        n, cfg = len(seq.prompt_token_ids), self.config
        if n == 0:
            raise RequestRejected(f"request {seq.request_id!r}: empty prompt")
        if n >= cfg.max_model_len:
            raise RequestRejected(f"request {seq.request_id!r}: prompt has {n} tokens; "
                                  f"max_model_len={cfg.max_model_len} leaves no room to generate")
        worst = min(n + seq.params.max_tokens, cfg.max_model_len)
        need = -(-worst // cfg.block_size)
        for tier, have in tiers:
            if need > have:
                raise RequestRejected(f"request {seq.request_id!r}: {worst} tokens need {need} KV blocks; "
                                      f"the {tier} has {have} (raise the KV budget or lower max_tokens)")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def metrics(self) -> dict:
        return {"device_used": self.allocator.num_used, "waiting": len(self.waiting),
                "running": len(self.running), "num_preemptions": self.num_preemptions}

    def abort(self, seq: Sequence) -> bool:
        """Drop an unfinished sequence and free its blocks; False if it is not here (finished, unknown)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        else:
            return False
        seq.finish_reason = "abort"
        self._release(seq)
        return True

    # ---- scheduling ----------------------------------------------------------------------------------
    def schedule(self, busy: set = frozenset(), limit: int | None = None) -> ScheduledBatch | None:
        """`busy`, `limit`: decode only running sequences not in `busy` (in flight in a pipeline), at most
        `limit` of them (engine/in_flight.py)."""
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode(busy, limit)

    def _schedule_prefill(self) -> ScheduledBatch | None:
        cfg, picked, tokens = self.config, [], 0
        while self.waiting and len(self.running) + len(picked) < cfg.max_num_seqs:
            seq = self.waiting[0]
            need = seq.blocks_needed(cfg.block_size)
            if picked and tokens + seq.num_tokens > cfg.prefill_budget:
                break
            if not self.allocator.can_allocate(need):
                break
            self.waiting.popleft()
            seq.block_table = self.allocator.allocate(need)
            seq.status = SequenceStatus.RUNNING
            picked.append(seq)
            tokens += seq.num_tokens
        if not picked:
            return None
        self.running.extend(picked)
        return ScheduledBatch(True, picked)

    def _schedule_decode(self, busy: set = frozenset(), limit: int | None = None) -> ScheduledBatch | None:
        scheduled = self._grow_running(busy, limit)
        return ScheduledBatch(False, scheduled) if scheduled else None

    def _grow_running(self, busy: set = frozenset(), limit: int | None = None) -> list[Sequence]:
        """Give every running sequence (not in `busy`; the first `limit`) the block its next token needs; when
        the pool is full, preempt the youngest of them not yet scheduled (or the sequence itself). Returns the
        sequences to decode."""
        self.fork_copies += fork_samples(self)          # samples of one request share its prompt's blocks
        bs, scheduled = self.config.block_size, []
        queue = [s for s in self.running if s not in busy][:limit]
        while queue:
            seq = queue.pop(0)
            while len(seq.block_table) < seq.blocks_needed(bs) and not self.allocator.can_allocate(1):
                victim = queue.pop() if queue else seq          # youngest not yet scheduled, else itself
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if len(seq.block_table) < seq.blocks_needed(bs):
                seq.block_table += self.allocator.allocate(1)
            scheduled.append(seq)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- results -------------------------------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, token_ids: list[int],
                    logprobs: list[dict[int, float] | None] | None = None) -> list[Sequence]:
        """Append one sampled token to each scheduled sequence; free and return the finished ones."""
        if len(token_ids) != len(batch.seqs):
            raise ValueError(f"{len(token_ids)} sampled tokens for {len(batch.seqs)} sequences")
        finished = []
        for i, (seq, tok) in enumerate(zip(batch.seqs, token_ids)):
            seq.append(int(tok), logprobs[i] if logprobs else None)
            if seq.is_finished:
                self._release(seq)
                finished.append(seq)
            else:
                self._keep(batch, seq)
        return finished

    def _release(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq.block_table:
            self.allocator.free(seq.block_table)
        seq.block_table = []
        if seq in self.running:
            self.running.remove(seq)

    def _keep(self, batch: ScheduledBatch, seq: Sequence) -> None:
        """An unfinished sequence after a step: here it simply keeps running."""
