"""The engine loop: schedule -> build inputs -> run -> sample -> postprocess -> collect finished."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from seesaw_ds.engine.executor import Executor
from seesaw_ds.engine.inputs import build_inputs
from seesaw_ds.engine.sampler import sample
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import Scheduler
from seesaw_ds.engine.sequence import RequestOutput, Sequence


@dataclass
class EngineStats:
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_batch_sizes: list[int] = field(default_factory=list)

    def account(self, batch, seconds: float) -> None:
        if batch.is_prefill:
            self.prefill_steps += 1
            self.prefill_tokens += batch.num_tokens
            self.prefill_s += seconds
        else:
            self.decode_steps += 1
            self.decode_tokens += batch.num_tokens
            self.decode_s += seconds
            self.decode_batch_sizes.append(len(batch.seqs))

    def summary(self) -> dict:
        sizes = self.decode_batch_sizes
        return {k: v for k, v in vars(self).items() if not isinstance(v, list)} | {
            "mean_decode_batch": sum(sizes) / len(sizes) if sizes else 0.0}


class LLMEngine:
    def __init__(self, scheduler: Scheduler, prefill_executor: Executor, decode_executor: Executor,
                 eos_token_ids: tuple[int, ...] = (), detokenize=None, sliding_window: int | None = None):
        self.scheduler = scheduler
        self.prefill_executor = prefill_executor
        self.decode_executor = decode_executor
        self.eos_token_ids = tuple(eos_token_ids)
        self.detokenize = detokenize
        self.sliding_window = sliding_window
        self.stats = EngineStats()
        self.stage: str | None = None          # "prefill" or "decode": what the last step ran (progress bars)
        self._request_ids: set[str] = set()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._request_ids:
            raise ValueError(f"duplicate request id {request_id!r}")
        seq = Sequence(str(request_id), [int(t) for t in prompt_token_ids], params, self.eos_token_ids,
                       self.scheduler.config.max_model_len)
        self.scheduler.add(seq)
        self._request_ids.add(seq.request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        t0 = time.perf_counter()
        inputs = build_inputs(batch, self.scheduler.config.block_size, self.sliding_window)
        executor = self.prefill_executor if batch.is_prefill else self.decode_executor
        logits = executor.prefill(inputs) if batch.is_prefill else executor.decode(inputs)
        tokens, logprobs = sample(logits, batch.seqs)
        finished = self.scheduler.postprocess(batch, tokens, logprobs)
        self._account(batch, time.perf_counter() - t0)
        self.stage = "prefill" if batch.is_prefill else "decode"
        for seq in finished:
            self._request_ids.discard(seq.request_id)
        return [self._output(s) for s in finished]

    def _account(self, batch, seconds: float) -> None:
        self.stats.account(batch, seconds)

    def _output(self, seq: Sequence) -> RequestOutput:
        return to_output(seq, self.detokenize)


def to_output(seq: Sequence, detokenize=None) -> RequestOutput:
    text = detokenize(seq.output_token_ids) if detokenize else ""
    return RequestOutput(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids), text,
                         seq.finish_reason, seq.logprobs)
