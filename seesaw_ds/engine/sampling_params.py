from __future__ import annotations

from dataclasses import dataclass, field, replace

SEED_STRIDE = 0x9E3779B97F4A7C15     # odd 64-bit constant: derived seeds of one request spread far apart


def sample_seed(seed: int | None, index: int) -> int | None:
    """The seed of sample `index` of a request seeded `seed`: (seed + index * SEED_STRIDE) mod 2**63.
    Sample 0 keeps the request's seed, so n=1 behaves as before; sample i's tokens equal those of an
    independent n=1 request with seed sample_seed(seed, i). None stays None (unseeded)."""
    if seed is None:
        return None
    return (seed + index * SEED_STRIDE) % (1 << 63)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature == 0 means greedy. `n` samples share one prefill of the
    prompt (its KV blocks are shared among them); each sample draws with its own derived seed."""
    temperature: float = 0.0
    top_k: int = -1                      # -1: no top-k filter
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None              # same seed, same tokens
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False             # benchmarks: always generate max_tokens
    logprobs: int | None = None          # None: off; N >= 0: chosen token + top-N alternatives
    n: int = 1                           # samples per prompt, prefilled once

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
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_sample(self, index: int) -> "SamplingParams":
        """The parameters sample `index` decodes with: one sample, its derived seed."""
        return replace(self, n=1, seed=sample_seed(self.seed, index))
