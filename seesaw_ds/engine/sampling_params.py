from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature == 0 means greedy."""
    temperature: float = 0.0
    top_k: int = -1                      # -1: no top-k filter
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None              # same seed, same tokens
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False             # benchmarks: always generate max_tokens
    logprobs: int | None = None          # None: off; N >= 0: chosen token + top-N alternatives

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"SamplingParams.logprobs must be None or >= 0, got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
