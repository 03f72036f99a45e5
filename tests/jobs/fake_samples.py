"""A deterministic stand-in for the engine's n samples per request, for the jobs' plumbing tests.

Sample i of a request is an independent n=1 request of the ReversingEngine with the sample's own seed (the
engine's rule, `SamplingParams.for_sample`) whose prompt is rotated by that seed: its completion is the
reversed rotated prompt, so different seeds give different completions and the same seed the same one. The
request finishes (one output with `samples`) when its last sample does; samples run interleaved with the other
requests', so requests finish out of order.
"""
from __future__ import annotations

import dataclasses

from tests.jobs.fake_engine import FakeRequestOutput, ReversingEngine, reversed_completion


@dataclasses.dataclass
class FakeSample:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: None = None


def rotated(prompt_ids: list[int], seed: int | None, index: int) -> list[int]:
    shift = (index if seed is None else seed) % max(len(prompt_ids), 1)
    return prompt_ids[shift:] + prompt_ids[:shift]


def sample_completion(prompt_ids: list[int], max_tokens: int, seed: int | None, index: int):
    """The fake's answer for one sample (token ids, finish reason), computed independently of its step loop."""
    return reversed_completion(rotated(prompt_ids, seed, index), max_tokens)


class SamplingEngine(ReversingEngine):
    def __init__(self, tokenizer, max_num_seqs: int = 4, step_seconds: float = 0.0):
        super().__init__(tokenizer, max_num_seqs=max_num_seqs, step_seconds=step_seconds)
        self.requests: dict[str, tuple[list[int], int, dict[int, FakeSample]]] = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params) -> None:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id}")
        self.requests[request_id] = (list(prompt_token_ids), params.n, {})
        for i in range(params.n):
            one = params.for_sample(i)
            super().add_request(f"{request_id}#{i}", rotated(list(prompt_token_ids), one.seed, i), one)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[FakeRequestOutput]:
        finished = []
        for sub in super().step():
            request_id, index = sub.request_id.rsplit("#", 1)
            prompt, n, samples = self.requests[request_id]
            samples[int(index)] = FakeSample(int(index), sub.token_ids, sub.text, sub.finish_reason)
            if len(samples) == n:
                del self.requests[request_id]
                ordered = [samples[i] for i in range(n)]
                out = FakeRequestOutput(request_id, prompt, ordered[0].token_ids, ordered[0].text,
                                        ordered[0].finish_reason)
                out.samples = ordered
                finished.append(out)
        return finished
