"""The engine: one loop for every layout, from one process to a PP -> TP pair over ranks.

    step: schedule -> [land last step's prefetch] -> [switch runtime] -> runtime.prepare (swap out, onboard,
          prefetch) -> runtime.forward (micro-batches) -> runtime.finish (flush the stash) -> sample once,
          on the rank that holds the logits -> broadcast -> postprocess

Every rank of a replica runs the same (pure) scheduler in lockstep; one process is the same engine with a
`NullComm`. Decode under a pipeline of single-rank stages keeps micro-batches in flight across steps
instead (`in_flight`, engine/in_flight.py): each step then schedules one of pp micro-batches. Built by
`build_engine` (builder.py), which decides the runtimes and whether the host tier is used.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Mapping

import torch

from seesaw_ds.engine.runtime import StageRuntime
from seesaw_ds.engine.sample_groups import copy_blocks, first_token_forks, make_samples, release_orphans
from seesaw_ds.engine.sampler import sample
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import ScheduledBatch, Scheduler
from seesaw_ds.engine.sequence import RequestOutput, SampleOutput, Sequence, SequenceStatus
from seesaw_ds.engine.stats import EngineStats
from seesaw_ds.models.vocab_head import ShardedLogits

log = logging.getLogger("seesaw_ds")


class Engine:
    def __init__(self, scheduler: Scheduler, prefill: StageRuntime, decode: StageRuntime, comm, *,
                 weights, layouts, model_config, model_folder: str | None = None, stats: EngineStats | None = None,
                 eos_token_ids=(), tokenizer=None, sliding_window: int | None = None,
                 on_close: Iterable[Callable[[], None]] = (), in_flight=None):
        self.scheduler = scheduler
        self.layouts = layouts               # StageLayouts: prefill and decode layouts (equal when static)
        self.model_config = model_config     # ModelConfig
        self.model_folder = model_folder     # the HF folder the weights came from (None: an in-memory model)
        self.runtimes = {"prefill": prefill, "decode": decode}
        self.comm = comm
        self.weights = weights               # WeightViews: the master copy and every module's views of it
        self.eos_token_ids = tuple(eos_token_ids)
        self.tokenizer = tokenizer           # None: token ids only (outputs carry no text)
        self.sliding_window = sliding_window
        self.stats = stats or EngineStats(device_blocks=scheduler.allocator.num_blocks)
        self._current: StageRuntime | None = None
        self._t_start = time.perf_counter()
        self._stage_mark = (0, 0.0)          # (kv bytes, copy seconds) at the start of the current runtime
        self._requests: dict[str, list[Sequence]] = {}     # unfinished request -> its n samples
        self._on_close = list(on_close)
        self.in_flight = in_flight           # InFlightDecode: decode under a pipeline kept full across steps
        self._ready: list[RequestOutput] = []   # finished by a drain outside step(), returned by the next step
        self.closed = False

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._check_open()
        request_id = str(request_id)
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        samples = make_samples(request_id, [int(t) for t in prompt_token_ids], params, self.eos_token_ids,
                               self.scheduler.config.max_model_len)
        self.scheduler.add(samples[0])          # the prompt is prefilled once; the others fork off it
        self._requests[request_id] = samples

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop an unfinished request (every rank calls it between steps); its KV blocks are freed at once,
        or as soon as a load in flight lands. Returns its partial output (finish_reason "abort" for each
        unfinished sample), or None for an unknown or finished request."""
        if self.in_flight is not None:          # no sequence may be in flight while the scheduler drops one
            self._ready += self.in_flight.drain(self)
        samples = self._requests.pop(str(request_id), None)
        if samples is None:
            return None
        for seq in samples:
            seq.forks = []                      # not forked yet: they hold no blocks
        for seq in samples:
            if not seq.is_finished and not self.scheduler.abort(seq):
                seq.finish_reason = "abort"
        return self._output(samples)

    def abort_all(self) -> list[RequestOutput]:
        """Drop every unfinished request, and any output a drain finished that no step returned yet."""
        outputs = [out for rid in self.unfinished_request_ids() if (out := self.abort(rid)) is not None]
        self._ready = []
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._ready)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def kv_metrics(self) -> dict:
        """The KV tiers now: blocks in use, requests waiting / stashed / running, preemptions, swap-outs."""
        return self.scheduler.metrics

    # ---- the loop ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._check_open()
        ready, self._ready = self._ready, []
        if self.in_flight is not None:
            return ready + self.in_flight.step(self)
        batch = self.scheduler.schedule()
        return ready + (self.run_batch(batch) if batch is not None else [])

    def run_batch(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """One scheduled step through its stage's runtime: forward, sample, postprocess."""
        t0 = time.perf_counter()
        if batch.wait_prefetch:              # before a switch: those copies belong to the decode runtime
            self.runtimes["decode"].land()
        runtime = self.runtimes["prefill" if batch.is_prefill else "decode"]
        switch_s = self.enter(runtime)
        runtime.prepare(batch)
        self.copy_forks(runtime, batch)
        forks = first_token_forks(batch.seqs) if batch.is_prefill else []
        rows = list(range(len(batch.seqs))) + [row for row, _ in forks]
        with runtime.collectives():
            logits = runtime.forward(batch, self.scheduler.config.block_size, self.sliding_window)
            runtime.finish(self.stats)
            tokens, logprobs = self._sample_and_share(logits, batch.seqs + [f for _, f in forks], rows,
                                                      runtime.sampling_rank, every_rank=runtime.layout.pp == 1)
        outputs = self.apply(batch, tokens, logprobs, forks)
        self.stats.account(batch.is_prefill, len(batch.seqs), batch.num_tokens,
                           time.perf_counter() - t0 - switch_s)
        return outputs

    def enter(self, runtime: StageRuntime) -> float:
        """Before a step's forward: make `runtime` current (seconds a switch took) and note the pool's use."""
        switch_s = self._enter(runtime) if runtime is not self._current else 0.0
        self.stats.device_blocks_peak = max(self.stats.device_blocks_peak, self.scheduler.allocator.num_used)
        return switch_s

    def copy_forks(self, runtime: StageRuntime, batch: ScheduledBatch) -> None:
        """Forked samples' own copy of the prompt's last, partial block, before the forward."""
        copies, self.scheduler.fork_copies = self.scheduler.fork_copies, []
        if copies:
            if batch.is_prefill:
                raise RuntimeError("internal: sample forks scheduled in a prefill step")
            copy_blocks(runtime.kv, copies)

    def apply(self, batch: ScheduledBatch, tokens: list[int], logprobs, forks=()) -> list[RequestOutput]:
        """A step's sampled tokens (one per sequence, then one per fork of a prefilled sequence) into the
        scheduler; returns the requests this finished."""
        finished = self._first_tokens(batch.seqs, list(forks), tokens, logprobs)
        finished += self.scheduler.postprocess(batch, tokens[:len(batch.seqs)],
                                               logprobs[:len(batch.seqs)] if logprobs else None)
        release_orphans(self.scheduler, [s for s in finished if s.forks])
        if self.scheduler.has_host_tier:
            self.stats.host_occupancy.append(self.scheduler.host_occupancy)
        outputs = []
        for seq in finished:
            samples = self._requests.get(seq.request_id)
            if samples is not None and all(s.is_finished for s in samples):
                del self._requests[seq.request_id]
                outputs.append(self._output(samples))
        return outputs

    @staticmethod
    def _first_tokens(seqs: list[Sequence], forks, tokens, logprobs) -> list[Sequence]:
        """Give each fork of a prefilled sequence its first token; one that finishes on it never forks."""
        finished, offset = [], len(seqs)
        for k, (row, fork) in enumerate(forks):
            fork.append(int(tokens[offset + k]), logprobs[offset + k] if logprobs else None)
            if fork.is_finished:
                fork.status = SequenceStatus.FINISHED
                seqs[row].forks.remove(fork)
                finished.append(fork)
        return finished

    def _enter(self, runtime: StageRuntime) -> float:
        """Make `runtime` current; record a switch unless this is the run's first runtime. Returns seconds."""
        previous, self._current = self._current, runtime
        moved, copy_s = self.stats.kv_copy_totals()
        rank_bytes, rank_copy_s = moved - self._stage_mark[0], copy_s - self._stage_mark[1]
        self._stage_mark = (moved, copy_s)
        if previous is None:                 # the first runtime is a start, not a switch
            return 0.0
        t0 = time.perf_counter()
        # Weights: both topologies hold views of the node's master copy, so on a CPU nothing is copied
        # (weight_bytes 0); on an accelerator this is where the new layout's shards would be materialised.
        # NOTE: the all-reduce is also the barrier: every rank has flushed its prefill writes (finish() of
        # each prefill step) before any rank onboards from the store.
        kv_bytes = self.comm.all_reduce(rank_bytes)
        dt = time.perf_counter() - t0
        occupancy = self.scheduler.host_occupancy
        self.stats.switch_s += dt
        self.stats.switches.append({
            "from": previous.name, "to": runtime.name, "seconds": dt, "at_s": time.perf_counter() - self._t_start,
            "weight_bytes": 0, "kv_bytes": kv_bytes, "kv_bytes_rank": rank_bytes, "kv_copy_s": rank_copy_s,
            "host_occupancy": occupancy})
        if self.comm.rank == 0:
            log.info("stage switch %s -> %s (%.3f s; the %s stage moved %.1f MB of KV; host store %.0f%% full)",
                     previous.name, runtime.name, dt, previous.name, kv_bytes / 1e6, 100 * occupancy)
        return dt

    def _sample_and_share(self, logits, seqs: list[Sequence], rows: list[int], src: int, every_rank: bool = True):
        """One token per sequence, sequence i drawing from logits row rows[i] (n samples of one prompt share
        its row at prefill), sampled on the rank holding the logits and broadcast to the others. Logits
        held as vocabulary slices (a vocabulary-parallel head): every rank of the TP group takes part; greedy
        rows exchange only their slices' maxima, anything else gathers the whole rows first. `every_rank`:
        each rank holds logits or a slice of them (no pipeline), so greedy slices need no broadcast."""
        if logits is not None and rows != list(range(len(rows))):      # None: a rank without logits (PP)
            if isinstance(logits, ShardedLogits):
                logits = logits.rows(torch.tensor(rows, dtype=torch.long, device=logits.local.device))
            else:
                logits = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
        picked = None
        if isinstance(logits, ShardedLogits):
            if all(s.params.greedy and s.params.logprobs is None for s in seqs):
                picked = logits.argmax()                             # the same tokens on every rank of the group
                if every_rank:
                    return picked.tolist(), None
            else:
                logits = logits.full()
        tokens = torch.zeros(len(seqs), dtype=torch.long)
        logprobs = None
        if self.comm.rank == src:
            ids, logprobs = (picked.tolist(), None) if picked is not None else sample(logits, seqs)
            tokens = torch.tensor(ids, dtype=torch.long)
        tokens = self.comm.broadcast(tokens, src=src)
        if any(s.params.logprobs is not None for s in seqs):
            logprobs = self.comm.broadcast_object(logprobs, src=src)
        return tokens.tolist(), logprobs

    def _output(self, samples: list[Sequence]) -> RequestOutput:
        decode = self.tokenizer is not None and self.comm.rank == 0
        outs = []
        for seq in samples:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True) if decode else ""
            chosen = None if seq.logprobs is None else \
                [d[t] for t, d in zip(seq.output_token_ids, seq.logprobs)]
            outs.append(SampleOutput(seq.sample_index, list(seq.output_token_ids), text, seq.finish_reason,
                                     seq.logprobs, chosen))
        first = outs[0]
        return RequestOutput(samples[0].request_id, samples[0].prompt_token_ids, first.token_ids, first.text,
                             first.finish_reason, first.logprobs, samples=outs)

    # ---- weights -------------------------------------------------------------------------------------
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None) -> int:
        """Write new weights (Hugging Face names; a trainer's state_dict or named_parameters) into the master
        copy that every layout's modules view; every rank calls it, rank 0's `weights` are written (others
        may pass None). The first update takes a private, writable copy of a shared master file and re-binds
        every layout's views to it, so the cached copy of the checkpoint is never changed. Returns bytes."""
        self._check_open()
        if self.has_unfinished():
            raise RuntimeError("update_weights between generate calls only: requests are still in flight")
        t0 = time.perf_counter()
        nbytes = self.weights.update(weights, self.comm)
        self.stats.weight_updates += 1
        self.stats.weight_update_bytes += nbytes
        self.stats.weight_update_s += time.perf_counter() - t0
        return nbytes

    # ---- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Join threads, release the KV tiers and the master copy's private memory; idempotent."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for runtime in {id(r): r for r in self.runtimes.values()}.values():
            try:
                runtime.close()
            except Exception as err:  # noqa: BLE001 - close the rest, then report the first
                errors.append(err)
        for fn in reversed(self._on_close):
            try:
                fn()
            except Exception as err:  # noqa: BLE001
                errors.append(err)
        self._on_close = []
        if errors:
            raise errors[0]

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the engine is closed")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
