"""The benchmark's fixed workloads, built once per run and handed to every engine as the same token ids.

| name     | requests | prompt tokens                                   | output tokens              |
|----------|----------|-------------------------------------------------|----------------------------|
| arxiv    | 32       | 1536: real text, "Summarize the following        | 64                         |
|          |          | article." + an arxiv-like document, tail cut    |                            |
| sharegpt | 128      | real ShareGPT first turns (>= 100 tokens)        | the recorded answer's      |
|          |          |                                                 | length (>= 20); p+o <= 2048 |
| fixed-b  | 128      | 128 random ids (seeded), as peers.md row B       | 256                        |

`scale` multiplies the request counts only (lengths stay), so a shrunk run keeps each workload's shape.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seesaw_ds.data import (BenchRequest, arxiv_like_requests, fixed_length_requests,  # noqa: E402
                            sample_sharegpt_requests)


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    name: str
    num_requests: int
    description: str

    def __post_init__(self):
        if self.num_requests <= 0:
            raise ValueError(f"WorkloadSpec.num_requests must be positive, got {self.num_requests}")

    def scaled(self, scale: float) -> "WorkloadSpec":
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        return dataclasses.replace(self, num_requests=max(1, round(self.num_requests * scale)))


WORKLOADS = {
    "arxiv": WorkloadSpec("arxiv", 32, "arxiv-like documents, 1536 prompt tokens, 64 output tokens"),
    "sharegpt": WorkloadSpec("sharegpt", 128, "ShareGPT first turns, recorded output lengths, p+o <= 2048"),
    "fixed-b": WorkloadSpec("fixed-b", 128, "random ids, 128 prompt tokens, 256 output tokens"),
}

SHAREGPT_MAX_TOTAL = 2048
ARXIV_PROMPT_LEN, ARXIV_OUTPUT_LEN = 1536, 64
FIXED_B_PROMPT_LEN, FIXED_B_OUTPUT_LEN = 128, 256


def _builders(tokenizer, vocab_size: int, seed: int) -> dict[str, Callable[[int], list[BenchRequest]]]:
    return {
        "arxiv": lambda n: arxiv_like_requests(tokenizer, n, ARXIV_PROMPT_LEN, ARXIV_OUTPUT_LEN, seed=seed),
        "sharegpt": lambda n: sample_sharegpt_requests(tokenizer, n, seed=seed, max_total_tokens=SHAREGPT_MAX_TOTAL),
        "fixed-b": lambda n: fixed_length_requests(n, FIXED_B_PROMPT_LEN, FIXED_B_OUTPUT_LEN, vocab_size, seed=seed),
    }


def parse_workload_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"unknown workload(s) {unknown or text!r}; choose from {', '.join(WORKLOADS)}")
    return names


def build_workloads(names: list[str], tokenizer, vocab_size: int, scale: float = 1.0,
                    seed: int = 0) -> dict[str, list[BenchRequest]]:
    builders = _builders(tokenizer, vocab_size, seed)
    return {name: builders[name](WORKLOADS[name].scaled(scale).num_requests) for name in names}


def workload_file_payload(workloads: dict[str, list[BenchRequest]]) -> dict:
    """The JSON the engine runners read (evals/peers/common.py)."""
    return {"workloads": [{"name": name, "requests": [r.to_json() for r in reqs]}
                          for name, reqs in workloads.items()]}
