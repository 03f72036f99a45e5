"""An embedded stand-in for arXiv summarisation: long documents, short outputs, built from the ShareGPT wheel.

No arXiv text ships with the project, so documents are made by concatenating ShareGPT turns (prompts and
answers, in a seeded order) until a per-row target length drawn from [min_tokens, max_tokens] is reached
(default 1500-3000 tokens, arXiv-like input lengths). Every turn is used at most once per call.

Columns: `id`, `article`, `abstract`, `prompt` (`INSTRUCTION` + blank line + article).
`abstract` is a PSEUDO-reference: the article's first few sentences (a lead-N summary), not a written
abstract. It gives metrics something to compare against; it says nothing about summary quality.

Lengths are counted with `tokenizer` when one is given (then article tokens lie in [min_tokens, max_tokens],
checked), else estimated as characters / `CHARS_PER_TOKEN`. Same arguments, same rows.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterator

import numpy as np

from seesaw_ds.data.requests import BenchRequest

INSTRUCTION = "Summarize the following article."
CHARS_PER_TOKEN = 4.3      # ShareGPT English text under the SmolLM2 tokenizer (measured 4.33)
ABSTRACT_SENTENCES = 3
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_OVERSHOOT_TOKENS = 64     # gather a little more than the target, then cut precisely


def _token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    if tokenizer is None:
        return lambda texts: [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def _paragraphs(rows, seed: int, count: Callable[[list[str]], list[int]],
                chunk_size: int = 32) -> Iterator[tuple[str, int]]:
    """(text, token count) of ShareGPT turns, prompt then reference, rows in `default_rng(seed)` order."""
    order = np.random.default_rng(seed).permutation(len(rows))
    for start in range(0, len(order), chunk_size):
        chunk = rows.select(order[start:start + chunk_size])
        texts = [t.strip() for pair in zip(list(chunk["prompt"]), list(chunk["reference"])) for t in pair]
        texts = [t for t in texts if t]
        yield from zip(texts, count(texts))


def _cut_to_tokens(text: str, target: int, tokenizer, count: Callable[[list[str]], list[int]]) -> str:
    """A prefix of `text` of at most `target` tokens (target or a token or two fewer)."""
    if tokenizer is None:
        return text[:int(target * CHARS_PER_TOKEN)].rstrip()
    ends = [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    if len(ends) <= target:
        return text
    for n_tokens in range(target, 0, -1):
        # NOTE: re-tokenising a cut can merge differently at its end: verify, and step back while it overflows.
        prefix = text[:ends[n_tokens - 1]].rstrip()
        if count([prefix])[0] <= target:
            return prefix
    return ""


def lead_sentences(text: str, n: int = ABSTRACT_SENTENCES, max_chars: int = 800) -> str:
    sentences = [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]
    return " ".join(sentences[:n])[:max_chars]


def arxiv_like_rows(num_rows: int, seed: int = 0, min_tokens: int = 1500, max_tokens: int = 3000,
                    tokenizer=None, dataset=None) -> dict[str, list]:
    """Column dict of `arxiv_like_dataset` (no `datasets` import needed)."""
    if num_rows <= 0:
        raise ValueError(f"num_rows must be positive, got {num_rows}")
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}")
    if dataset is None:
        from seesaw_ds.data.sharegpt import sharegpt_dataset
        dataset = sharegpt_dataset()
    count = _token_counter(tokenizer)
    rng = np.random.default_rng(seed)
    # NOTE: targets keep a 4-token margin above min_tokens: the cut lands 0-2 tokens under its target.
    targets = rng.integers(min(min_tokens + 4, max_tokens), max_tokens + 1, size=num_rows)
    stream = _paragraphs(dataset, seed + 1, count)
    columns: dict[str, list] = {"id": [], "article": [], "abstract": [], "prompt": []}
    for row, target in enumerate(targets.tolist()):
        parts, gathered = [], 0
        for text, n_tokens in stream:
            parts.append(text)
            gathered += n_tokens + 1  # +1: the blank line between turns
            if gathered >= target + _OVERSHOOT_TOKENS:
                break
        else:
            raise ValueError(f"ShareGPT text ran out after {row} of {num_rows} arxiv-like rows")
        article = _cut_to_tokens("\n\n".join(parts), target, tokenizer, count)
        n_article = count([article])[0]
        if not min_tokens <= n_article <= max_tokens:
            raise RuntimeError(f"arxiv-like row {row}: {n_article} tokens outside [{min_tokens}, {max_tokens}]")
        columns["id"].append(f"arxiv-like-{seed}-{row}")
        columns["article"].append(article)
        columns["abstract"].append(lead_sentences(article))
        columns["prompt"].append(f"{INSTRUCTION}\n\n{article}")
    return columns


def arxiv_like_dataset(num_rows: int, seed: int = 0, min_tokens: int = 1500, max_tokens: int = 3000,
                       tokenizer=None, dataset=None):
    """`num_rows` long documents with pseudo-reference abstracts; see the module docstring."""
    import datasets
    return datasets.Dataset.from_dict(arxiv_like_rows(num_rows, seed, min_tokens, max_tokens, tokenizer, dataset))


def arxiv_like_requests(tokenizer, num_requests: int, prompt_len: int, output_len: int, seed: int = 0,
                        dataset=None) -> list[BenchRequest]:
    """Requests of exactly `prompt_len` prompt tokens: `INSTRUCTION` + article, tokenised, tail cut off."""
    rows = arxiv_like_rows(num_requests, seed, min_tokens=max(prompt_len, 1500),
                           max_tokens=max(prompt_len + 64, 3000), tokenizer=tokenizer, dataset=dataset)
    requests = []
    for prompt in rows["prompt"]:
        ids = tokenizer(prompt).input_ids
        if len(ids) < prompt_len:
            raise RuntimeError(f"arxiv-like prompt has {len(ids)} tokens, fewer than prompt_len={prompt_len}")
        requests.append(BenchRequest(tuple(ids[:prompt_len]), output_len))
    return requests
