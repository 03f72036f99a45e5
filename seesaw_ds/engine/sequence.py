"""Per-request state (CPU bookkeeping only) and the finished-request output."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from seesaw_ds.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # no KV anywhere: (re)prefill from scratch
    STASHED = "stashed"        # KV in the host store, waiting for room in the device pool
    PREFETCHING = "prefetching"  # device blocks reserved, host blocks pinned, host -> device copy in flight
    RUNNING = "running"        # KV in the device pool, decoding
    FINISHED = "finished"


@dataclass(eq=False)      # identity: two samples of one request may hold equal fields
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)     # device pool blocks
    host_blocks: list[int] = field(default_factory=list)     # host store blocks (tiered engine)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    sample_index: int = 0                  # which of the request's n samples this is
    # samples of the same request that fork off this one once it decodes (sample_groups.py): they share
    # its prompt KV blocks; until then they hold no blocks (their first token is sampled at its prefill)
    forks: list["Sequence"] = field(default_factory=list)

    def __post_init__(self):
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def blocks_needed(self, block_size: int) -> int:
        """Blocks to hold the KV of every token fed so far (the last sampled token included)."""
        return -(-self.num_tokens // block_size)

    def append(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.output_token_ids.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
        p = self.params
        if not p.ignore_eos and token_id in self.eos_token_ids:
            self.finish_reason = "stop"
        elif token_id in p.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= p.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class SampleOutput:
    """One of a request's n samples. `token_logprobs[t]` is the log-probability of the sampled token t under
    the model (log_softmax of the raw logits, temperature and top-k/p not applied: what a trainer's forward
    gives); set when `SamplingParams.logprobs` is not None, as is `logprobs` (chosen + top-N per token)."""
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[dict[int, float]] | None = None
    token_logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    """A finished request. `samples` holds all n samples in index order; the flat fields are sample 0's."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[dict[int, float]] | None = None
    prompt: str | None = None
    samples: list[SampleOutput] = field(default_factory=list)
