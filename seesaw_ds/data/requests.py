"""One benchmark request: prompt token ids and the exact number of tokens to generate."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]
    output_len: int  # tokens to generate, EOS ignored

    def __post_init__(self):
        if not isinstance(self.prompt_token_ids, tuple):
            object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))
        if not self.prompt_token_ids:
            raise ValueError("BenchRequest.prompt_token_ids must not be empty")
        if min(self.prompt_token_ids) < 0:
            raise ValueError("BenchRequest.prompt_token_ids must be non-negative token ids")
        if self.output_len <= 0:
            raise ValueError(f"BenchRequest.output_len must be positive, got {self.output_len}")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def __iter__(self) -> Iterator:
        """Unpacks as `(prompt_token_ids, output_len)`."""
        return iter((list(self.prompt_token_ids), self.output_len))

    def to_json(self) -> dict:
        return {"prompt_token_ids": list(self.prompt_token_ids), "output_len": self.output_len}

    @classmethod
    def from_json(cls, row: dict) -> "BenchRequest":
        return cls(tuple(row["prompt_token_ids"]), int(row["output_len"]))


def total_tokens(requests: Sequence[BenchRequest]) -> tuple[int, int]:
    """(prompt tokens, output tokens) summed over the requests."""
    return sum(r.prompt_len for r in requests), sum(r.output_len for r in requests)
