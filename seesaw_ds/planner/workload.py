"""Workload length distributions, summarised by their means (the throughput model uses means only)."""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    name: str
    mean_prompt_len: float   # tokens per prompt
    mean_output_len: float   # tokens generated per request (EOS ignored)
    num_requests: int

    def __post_init__(self):
        for field in ("mean_prompt_len", "mean_output_len", "num_requests"):
            if not getattr(self, field) > 0:
                raise ValueError(f"WorkloadSpec.{field} must be positive, got {getattr(self, field)}")

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
        return dataclasses.replace(self, num_requests=num_requests)


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
