"""Decode under a pipeline with micro-batches in flight across steps (the stage's side: distributed/pipe_decode.py).

Each engine step is one tick: it schedules micro-batch i (running sequences not already in flight, at most
ceil(running / pp) of them), runs it through this rank's stage, and retires micro-batch i - pp + 1, whose
tokens have by then come back from the last stage. Every rank applies the same scheduler operations in the
same order (schedule i, then retire i - pp + 1), so the ranks' schedulers stay equal although stage 0 runs
pp - 1 ticks ahead of the last stage:

    tick:      0     1     2     3     4 ...
    stage 0:   mb0   mb1   mb2   mb3   mb4          mb2 holds mb0's sequences, one token on
    stage 1:         mb0   mb1   mb2   mb3          (pp = 2: each stage busy every tick)

A prefill step drains the pipeline first (DeepSpeed's pipeline engine runs the prefill pass), as does an
abort. A micro-batch's preemptions pick only among sequences not in flight.
"""
from __future__ import annotations

import time
from collections import deque

from seesaw_ds.engine.inputs import build_inputs
from seesaw_ds.engine.sampler import sample
from seesaw_ds.engine.scheduler import ScheduledBatch


class InFlightDecode:
    def __init__(self, pipe, runtime):
        """`pipe`: this rank's StagePipe; `runtime`: the (static) runtime whose pool the stage's KV lives in."""
        self.pipe, self.runtime = pipe, runtime
        self.pending: deque[tuple[ScheduledBatch, list[int] | None, list | None]] = deque()

    def busy(self) -> set:
        return {seq for batch, _, _ in self.pending for seq in batch.seqs}

    def step(self, engine) -> list:
        sched = engine.scheduler
        batch = sched.schedule(busy=self.busy(), limit=-(-len(sched.running) // self.pipe.pp))
        if batch is not None and batch.is_prefill:
            return self.drain(engine) + engine.run_batch(batch)
        t0 = time.perf_counter()
        if batch is None:                       # everything runnable is in flight: retire the oldest
            outputs = self._retire(engine) if self.pending else []
            engine.stats.decode_s += time.perf_counter() - t0
            return outputs
        switch_s = engine.enter(self.runtime)
        engine.copy_forks(self.runtime, batch)
        cfg = sched.config
        logits = self.pipe.forward(build_inputs(batch, cfg.block_size, engine.sliding_window), self.runtime.kv)
        tokens = logprobs = None
        if logits is not None:                  # the last stage samples, and sends the tokens back
            tokens, logprobs = sample(logits, batch.seqs)
            self.pipe.send_tokens(tokens, logprobs if _wants_logprobs(batch) else None)
        self.pending.append((batch, tokens, logprobs))
        outputs = self._retire(engine) if len(self.pending) >= self.pipe.pp else []
        engine.stats.account(False, len(batch.seqs), batch.num_tokens, time.perf_counter() - t0 - switch_s)
        return outputs

    def drain(self, engine) -> list:
        """Retire every micro-batch in flight (collective: every rank of the pipeline calls it)."""
        t0, outputs = time.perf_counter(), []
        while self.pending:
            outputs += self._retire(engine)     # the last one flushes this rank's sends
        engine.stats.decode_s += time.perf_counter() - t0
        return outputs

    def _retire(self, engine) -> list:
        batch, tokens, logprobs = self.pending.popleft()
        if tokens is None:
            tokens, logprobs = self.pipe.recv_tokens(len(batch.seqs), _wants_logprobs(batch))
        if not self.pending:        # the pipeline is empty: our sends land before the caller may stop or another
            self.pipe.flush()       # pipeline take the links (gloo never delivers a send whose handle is freed first)
        return engine.apply(batch, tokens, logprobs)


def _wants_logprobs(batch: ScheduledBatch) -> bool:
    return any(s.params.logprobs is not None for s in batch.seqs)
