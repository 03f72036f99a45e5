"""A job recipe: YAML -> nested frozen dataclasses, command-line overrides, and a generated --help text.

    recipe = load_recipe("recipes/arxiv.yaml", overrides=["sampling.temperature=0.7", "data.limit=100"])
"""
from __future__ import annotations

import dataclasses
import string
import typing
from typing import Any, Literal, Mapping, Sequence

import yaml

from seesaw_ds.engine.config import EngineConfig
from seesaw_ds.jobs.parallel_spec import validate_parallel
from seesaw_ds.jobs.schema import RecipeError, build, check, describe, option, to_plain

_DTYPES = ("auto", "bfloat16", "bf16", "float32", "fp32", "float16", "fp16")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = option("embedded:smollm2", "model: hub id, local folder, or embedded:NAME")
    dtype: str = option("auto", "compute dtype: auto (bfloat16 where the hardware has native bf16, else float32) "
                                "| bfloat16 | float32 | float16")
    cache_dir: str | None = option(None, "folder for downloaded or converted weights (null: default cache)")

    def __post_init__(self):
        check(self.dtype in _DTYPES, "dtype", f"must be one of {', '.join(_DTYPES)}; got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class ColumnsSection:
    prompt: str | None = option(None, "column holding the prompt text")
    messages: str | None = option(None, "column holding chat messages, rendered with the chat template")
    prompt_token_ids: str | None = option(None, "column holding prompt token ids, used as they are")
    id: str | None = option(None, "column holding a unique row id (null: the row index)")
    max_tokens: str | None = option(None, "column holding a per-row output token limit (null: sampling.max_tokens)")
    carry: tuple[str, ...] = option((), "columns copied unchanged into the output rows")


@dataclasses.dataclass(frozen=True)
class DataSection:
    source: str | None = option(None, "hub id, local json/jsonl/parquet/csv/arrow file, save_to_disk folder, "
                                      "embedded:NAME or synthetic")
    split: str = option("train", "dataset split")
    subset: str | None = option(None, "hub dataset configuration name")
    options: dict = option({}, "keyword options passed to an embedded or synthetic source")
    fallback: str | None = option(None, "source used (announced) when the hub cannot be reached")
    columns: ColumnsSection = option(ColumnsSection(), "")
    template: str | None = option(None, "prompt template with {column} fields, e.g. 'Summarise:\\n{article}'")
    chat_template: bool = option(False, "render the prompt as one user turn through the tokenizer's chat template")
    limit: int | None = option(None, "use only the first N rows of the source")
    min_prompt_tokens: int = option(0, "skip prompts shorter than this (counted)")
    max_prompt_tokens: int | None = option(None, "prompt token limit (null: engine.max_model_len - max_tokens)")
    over_limit: Literal["skip", "truncate", "error"] = option("skip", "what to do with a prompt over the limit")
    truncate_field: str | None = option(None, "template field shortened by over_limit=truncate")
    bad_rows: Literal["skip", "error"] = option("skip", "what to do with an empty or non-text prompt")
    streaming: bool = option(False, "stream the source instead of loading it (inputs larger than memory)")

    def __post_init__(self):
        check(self.source is not None and self.source != "", "source", "is required")
        kinds = [k for k, v in (("columns.prompt", self.columns.prompt), ("columns.messages", self.columns.messages),
                                ("columns.prompt_token_ids", self.columns.prompt_token_ids),
                                ("template", self.template)) if v is not None]
        check(len(kinds) == 1, "columns" if not kinds else kinds[-1],
              "conflicts with " + ", ".join("data." + k for k in kinds[:-1]) + " (give one prompt source)" if kinds else
              "needs one of prompt, messages, prompt_token_ids (or data.template)")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        check(self.min_prompt_tokens >= 0, "min_prompt_tokens", f"must be >= 0, got {self.min_prompt_tokens}")
        check(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens",
              f"must be >= 1 or null, got {self.max_prompt_tokens}")
        fields = self.template_fields()
        if self.truncate_field is not None:
            check(self.truncate_field in fields, "truncate_field",
                  f"must name a field of data.template ({', '.join(fields) or 'none'}); got {self.truncate_field!r}")
        elif self.over_limit == "truncate" and len(fields) > 1:
            raise RecipeError("truncate_field", f"is needed with over_limit=truncate and a template with "
                                                f"several fields ({', '.join(fields)})")

    def template_fields(self) -> tuple[str, ...]:
        if self.template is None:
            return ()
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        except ValueError as err:
            raise RecipeError("template", f"is not a valid template: {err}") from None
        for name in names:
            check(name.isidentifier() or name.replace("-", "_").isidentifier(), "template",
                  f"field {{{name}}} must be a plain column name")
        return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    temperature: float = option(0.0, "0: greedy")
    top_k: int = option(-1, "-1: all tokens")
    top_p: float = option(1.0, "nucleus probability mass")
    max_tokens: int = option(256, "output token limit per row (unless data.columns.max_tokens)")
    seed: int | None = option(None, "base seed; each row samples with a seed derived from it and the row id "
                                    "(sample i of a row: see sampling.n)")
    stop_token_ids: tuple[int, ...] = option((), "extra token ids that end a completion")
    ignore_eos: bool = option(False, "keep generating past EOS (benchmarks)")
    logprobs: int | None = option(None, "log-probabilities of the top N tokens per step (null: none)")
    n: int = option(1, "samples per row, sharing one prefill: n output rows with sample_index 0..n-1; sample i "
                       "draws with seed sample_seed(row seed, i), sample 0 with the row seed itself")

    def __post_init__(self):
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 or >= 1, got {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        check(self.logprobs is None or self.logprobs >= 0, "logprobs", f"must be >= 0 or null, got {self.logprobs}")
        check(self.n >= 1, "n", f"must be an integer >= 1, got {self.n}")
        # NOTE: as vLLM's SamplingParams does: greedy decoding would give n identical samples
        check(self.n == 1 or self.temperature > 0, "n", f"must be 1 with greedy decoding (sampling.temperature 0: "
                                                        f"the samples would be identical), got {self.n}")


@dataclasses.dataclass(frozen=True)
class KvSection:
    device_gb: float = option(2.0, "device KV cache size per rank, GiB")
    host_gb: float = option(4.0, "host-memory KV store size per node, GiB (several ranks only)")
    threshold: float = option(0.25, "decode hands back to prefill once the host store has drained to this "
                                    "fill fraction (several ranks only)")

    def __post_init__(self):
        check(self.device_gb > 0, "device_gb", f"must be > 0, got {self.device_gb}")
        check(self.host_gb > 0, "host_gb", f"must be > 0, got {self.host_gb}")
        check(0 <= self.threshold < 1, "threshold", f"must be in [0, 1), got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class EngineSection:
    max_model_len: int = option(2048, "prompt + output token limit per sequence")
    max_num_seqs: int = option(256, "sequences decoded together at most")
    max_num_batched_tokens: int = option(4096, "tokens per prefill step at most")
    request_window: int = option(0, "requests queued in the engine at once (0: 4 x max_num_seqs)")
    allow_cross_node_tp: bool = option(False, "let a TP group span nodes (its all-reduces then cross their link)")
    kv: KvSection = option(KvSection(), "")

    def __post_init__(self):
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.request_window >= 0, "request_window", f"must be >= 0, got {self.request_window}")

    @property
    def window(self) -> int:
        return self.request_window or 4 * self.max_num_seqs


@dataclasses.dataclass(frozen=True)
class OutputSection:
    dir: str | None = option(None, "output folder of parquet shards and manifest.json (required)")
    shard_rows: int = option(1000, "rows per shard")
    flush_seconds: float = option(300.0, "write a shard at least this often when rows are waiting")
    resume: bool = option(True, "skip rows already in the folder's shards")
    overwrite: bool = option(False, "delete earlier shards of the folder first")
    token_ids: bool = option(True, "store prompt_token_ids and completion_token_ids columns")

    def __post_init__(self):
        check(self.shard_rows >= 1, "shard_rows", f"must be >= 1, got {self.shard_rows}")
        check(self.flush_seconds > 0, "flush_seconds", f"must be > 0, got {self.flush_seconds}")


@dataclasses.dataclass(frozen=True)
class WandbSection:
    project: str | None = option(None, "wandb project (null: no tracking)")
    name: str | None = option(None, "wandb run name")
    mode: Literal["online", "offline", "disabled"] = option(
        "online", "online (offline when no API key is set) | offline | disabled; WANDB_MODE overrides it")
    samples: int = option(16, "sample generations logged as a table")

    def __post_init__(self):
        check(self.samples >= 0, "samples", f"must be >= 0, got {self.samples}")


@dataclasses.dataclass(frozen=True)
class TrackingSection:
    wandb: WandbSection = option(WandbSection(), "")


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: ModelSection = option(ModelSection(), "")
    data: DataSection = option(None, "")
    sampling: SamplingSection = option(SamplingSection(), "")
    engine: EngineSection = option(EngineSection(), "")
    parallel: Any = option("seesaw", "auto (planner) | seesaw (prefill pp=N -> decode tp=N on N ranks, or the static "
                                      "layout the planner predicts faster, or one rank on every core of a CPU "
                                      "machine) | "
                                      "{tp: 1, pp: 1, dp: 1} | {prefill: {pp: 2}, decode: {tp: 2}, dp: 1} | "
                                      "a label: 1proc, TP2, PP2, PP2->TP2 (dp 1 unless given: TP1xDP2)")
    output: OutputSection = option(OutputSection(), "")
    tracking: TrackingSection = option(TrackingSection(), "")

    def __post_init__(self):
        object.__setattr__(self, "parallel", validate_parallel(self.parallel))

    def engine_config(self, parallel: Any = None) -> EngineConfig:
        """The engine's settings (`seesaw_ds.LLM(config=...)`); `parallel`: the resolved layouts, if any."""
        return EngineConfig(model=self.model.name, dtype=self.model.dtype, parallel=parallel,
                            max_model_len=self.engine.max_model_len, max_num_seqs=self.engine.max_num_seqs,
                            max_num_batched_tokens=self.engine.max_num_batched_tokens,
                            kv_device_gb=self.engine.kv.device_gb, kv_host_gb=self.engine.kv.host_gb,
                            kv_threshold=self.engine.kv.threshold, cache_dir=self.model.cache_dir,
                            allow_cross_node_tp=self.engine.allow_cross_node_tp)

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `seesaw_ds.SamplingParams(...)` (per-row max_tokens/seed are set later)."""
        return to_plain(self.sampling) | {"stop_token_ids": tuple(self.sampling.stop_token_ids)}

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def _field_type(dotted: str):
    """Annotation of a dotted recipe key, or None below a free-form mapping."""
    cls: Any = Recipe
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def apply_overrides(raw: Mapping, overrides: Sequence[str]) -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a copy of the raw recipe mapping."""
    tree = _deep_copy(raw)
    for text in overrides:
        key, sep, value_text = text.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise RecipeError("", f"override {text!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError:
            value = value_text
        if _field_type(key) in (str, str | None) and value is not None and not isinstance(value, str):
            value = value_text  # e.g. a template like "{article}" that YAML reads as a mapping
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return tree


def _deep_copy(value):
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    return list(map(_deep_copy, value)) if isinstance(value, list) else value


def parse_recipe(raw: Mapping | None, overrides: Sequence[str] = ()) -> Recipe:
    return build(Recipe, apply_overrides(raw or {}, overrides))


def load_recipe(path: str, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe file; malformed YAML or a bad key raises RecipeError with one clear line."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle)
    except OSError as err:
        raise RecipeError("", f"cannot read recipe {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError("", f"recipe {path}{where}: malformed YAML ({problem})") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise RecipeError("", f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    return parse_recipe(raw, overrides)


def recipe_help() -> str:
    """Every recipe key with its type, default and a one-line description."""
    rows = describe(Recipe)
    width = max(len(key) for key, *_ in rows)
    lines = ["Recipe keys (set in YAML or override with key.sub=value):"]
    for key, type_name, default, text in rows:
        lines.append(f"  {key:<{width}}  {text} [{type_name}, default: {default}]")
    return "\n".join(lines)
