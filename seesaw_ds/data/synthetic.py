"""Fixed-length prompts of random token ids (seeded), for benchmarks where only the lengths matter."""
from __future__ import annotations

import numpy as np

from seesaw_ds.data.requests import BenchRequest


def random_token_prompts(num_requests: int, prompt_len: int, vocab_size: int, seed: int = 0,
                         low: int = 0) -> list[list[int]]:
    """`num_requests` lists of `prompt_len` ids drawn uniformly from [low, vocab_size) by `default_rng(seed)`."""
    if num_requests <= 0 or prompt_len <= 0:
        raise ValueError(f"num_requests and prompt_len must be positive, got {num_requests}, {prompt_len}")
    if not 0 <= low < vocab_size:
        raise ValueError(f"need 0 <= low < vocab_size, got low={low}, vocab_size={vocab_size}")
    ids = np.random.default_rng(seed).integers(low, vocab_size, size=(num_requests, prompt_len))  # [N, P]
    return ids.tolist()


def fixed_length_requests(num_requests: int, prompt_len: int, output_len: int, vocab_size: int,
                          seed: int = 0, low: int = 0) -> list[BenchRequest]:
    prompts = random_token_prompts(num_requests, prompt_len, vocab_size, seed, low)
    return [BenchRequest(tuple(p), output_len) for p in prompts]
