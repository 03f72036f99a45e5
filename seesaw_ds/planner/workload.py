"""Workload length distributions: their means, and optionally every request's output length.

With `output_lens`, the planner costs decode as the engine runs it (`decode_schedule`): continuous batching
admits requests in order up to the batch limit and a finished request frees its slot, so a few long outputs
make a tail of steps at a small batch. Means alone assume every step runs the full batch, which over-states
the throughput of a short job whose output lengths vary (ShareGPT: 8 requests, mean 368 tokens, longest 1024).
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import re


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    name: str
    mean_prompt_len: float   # tokens per prompt
    mean_output_len: float   # tokens generated per request (EOS ignored)
    num_requests: int
    output_lens: tuple[int, ...] | None = None   # per request, in admission order (None: every one the mean)

    def __post_init__(self):
        for field in ("mean_prompt_len", "mean_output_len", "num_requests"):
            if not getattr(self, field) > 0:
                raise ValueError(f"WorkloadSpec.{field} must be positive, got {getattr(self, field)}")
        if self.output_lens is not None:
            lens = tuple(int(n) for n in self.output_lens)
            if len(lens) != self.num_requests or min(lens) < 1:
                raise ValueError(f"WorkloadSpec.output_lens must hold num_requests={self.num_requests} lengths "
                                 f">= 1, got {len(lens)} (min {min(lens, default=0)})")
            object.__setattr__(self, "output_lens", lens)

    @classmethod
    def from_lengths(cls, name: str, prompt_lens, output_lens) -> "WorkloadSpec":
        """The spec of a concrete request list: mean prompt length, and every output length."""
        prompt_lens, output_lens = list(prompt_lens), [int(n) for n in output_lens]
        if not prompt_lens or len(prompt_lens) != len(output_lens):
            raise ValueError("WorkloadSpec.from_lengths needs one prompt and one output length per request")
        return cls(name, sum(prompt_lens) / len(prompt_lens), sum(output_lens) / len(output_lens),
                   len(output_lens), tuple(output_lens))

    @property
    def prompt_tokens(self) -> float:
        return self.num_requests * self.mean_prompt_len

    @property
    def output_tokens(self) -> float:
        return self.num_requests * self.mean_output_len

    @property
    def total_tokens(self) -> float:
        return self.prompt_tokens + self.output_tokens

    @property
    def decode_context_len(self) -> float:
        """Mean context length a sequence holds while it decodes: prompt plus half its output."""
        return self.mean_prompt_len + self.mean_output_len / 2

    def with_requests(self, num_requests: int) -> "WorkloadSpec":
        if num_requests == self.num_requests:
            return self
        return dataclasses.replace(self, num_requests=num_requests, output_lens=None)


def decode_schedule(output_lens, batch_limit: int) -> dict[int, int]:
    """{batch: decode steps run at that batch} of continuous batching: requests admitted in order while
    fewer than `batch_limit` decode, each step makes one token per running request, a request leaves after
    its output length. The steps sum to the engine's decode step count; batch x steps to the output tokens."""
    if batch_limit < 1:
        raise ValueError(f"decode_schedule: batch_limit must be >= 1, got {batch_limit}")
    steps: collections.Counter = collections.Counter()
    pending, running, now = list(output_lens), [], 0   # running: heap of finishing step numbers
    pending.reverse()
    while pending or running:
        while pending and len(running) < batch_limit:
            heapq.heappush(running, now + pending.pop())
        until = running[0]                               # the batch holds until the next request finishes
        steps[len(running)] += until - now
        now = until
        while running and running[0] == now:
            heapq.heappop(running)
    return dict(steps)


WORKLOADS = {
    # arxiv summarisation: long papers truncated so that prompt + output <= 4096, abstract-length outputs.
    # Means are approximate.
    "arxiv": WorkloadSpec("arxiv", mean_prompt_len=3300, mean_output_len=200, num_requests=1000),
    # ShareGPT V3, first turn as prompt, recorded answer as output; prompts >= 100, outputs >= 20 tokens,
    # prompt + output <= 4096. Means estimated from the data at ~4 characters per token.
    "sharegpt": WorkloadSpec("sharegpt", mean_prompt_len=580, mean_output_len=240, num_requests=2000),
    # The CPU benchmark shapes (docs/peers.md): A = 32 x 1536 -> 64, B = 128 x 128 -> 256.
    "arxiv-small": WorkloadSpec("arxiv-small", mean_prompt_len=1536, mean_output_len=64, num_requests=32),
    "sharegpt-small": WorkloadSpec("sharegpt-small", mean_prompt_len=128, mean_output_len=256, num_requests=128),
}

_CUSTOM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*/\s*(\d+)\s*$")


def parse_workload(spec: str | WorkloadSpec, num_requests: int | None = None) -> WorkloadSpec:
    """A preset name (arxiv, sharegpt, arxiv-small, sharegpt-small) or "PROMPT/OUTPUT/REQUESTS"."""
    if isinstance(spec, WorkloadSpec):
        workload = spec
    elif str(spec).lower() in WORKLOADS:
        workload = WORKLOADS[str(spec).lower()]
    elif match := _CUSTOM_RE.match(str(spec)):
        workload = WorkloadSpec(f"custom({spec.strip()})", float(match.group(1)), float(match.group(2)),
                                int(match.group(3)))
    else:
        raise ValueError(f"unknown workload {spec!r}; use one of {', '.join(WORKLOADS)} "
                         f"or 'PROMPT/OUTPUT/REQUESTS' such as '1536/64/32'")
    return workload.with_requests(num_requests) if num_requests else workload
