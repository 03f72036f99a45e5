"""A deterministic stand-in honouring the engine API (add_request / step / has_unfinished), for plumbing tests.

Its completion is the prompt's token ids reversed, cut to max_tokens ("length"), or the whole reversed prompt
when shorter ("stop"); each step emits one token for up to `max_num_seqs` running requests, so requests
finish out of order.
"""
from __future__ import annotations

import dataclasses
import time

from seesaw_ds.engine.stats import EngineStats


@dataclasses.dataclass
class FakeRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: None = None


def reversed_completion(prompt_ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """The fake engine's answer, computed independently of its step loop."""
    target = list(reversed(prompt_ids))[:max_tokens]
    return target, "length" if len(prompt_ids) >= max_tokens else "stop"


class ReversingEngine:
    def __init__(self, tokenizer, max_num_seqs: int = 4, step_seconds: float = 0.0):
        self.tokenizer, self.max_num_seqs, self.step_seconds = tokenizer, max_num_seqs, step_seconds
        self.waiting: list[tuple[str, list[int], object]] = []
        self.running: dict[str, tuple[list[int], object, list[int]]] = {}
        self.max_in_flight = 0
        self.stats = EngineStats(stage="decode")
        self.kv_metrics = {}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params) -> None:
        if request_id in self.running or any(r == request_id for r, _, _ in self.waiting):
            raise ValueError(f"duplicate request id {request_id}")
        self.waiting.append((request_id, list(prompt_token_ids), params))
        self.max_in_flight = max(self.max_in_flight, len(self.waiting) + len(self.running))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[FakeRequestOutput]:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        while self.waiting and len(self.running) < self.max_num_seqs:
            request_id, ids, params = self.waiting.pop(0)
            self.running[request_id] = (ids, params, [])
        finished = []
        for request_id, (ids, params, out) in list(self.running.items()):
            source = ids[::-1]
            out.append(source[len(out)])
            if len(out) == min(params.max_tokens, len(ids)):
                del self.running[request_id]
                reason = "length" if len(out) == params.max_tokens else "stop"
                finished.append(FakeRequestOutput(request_id, ids, out, self.tokenizer.decode(out), reason))
        return finished
