"""The offline Python API, in the shape vLLM users know:

    llm = LLM(model="embedded:smollm2", dtype="bfloat16")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import os
from typing import Any, Sequence as Seq

import torch
from tqdm.auto import tqdm

from seesaw_ds.engine.executor import LocalExecutor
from seesaw_ds.engine.llm_engine import LLMEngine
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.scheduler import Scheduler, SchedulerConfig
from seesaw_ds.engine.sequence import RequestOutput
from seesaw_ds.kv.pool import KVPool, KVPoolSpec
from seesaw_ds.models.config import ModelConfig, parse_dtype
from seesaw_ds.models.loader import load_model
from seesaw_ds.models.runner import ModelRunner

PromptLike = Any   # str | list[int] | list[{"role", "content"}] | {"prompt": str} | {"prompt_token_ids": [...]}


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class LLM:
    _calls = 0
    """One process: the paged engine. Under a launcher (WORLD_SIZE > 1) or with `parallel=` given: the
    distributed Seesaw engine (prefill and decode layouts, host KV tier); every rank constructs the LLM and
    calls `generate` with the same prompts; outputs are complete on rank 0 (`is_main`)."""

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int = 2048, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, kv_cache_gb: float = 2.0, block_size: int = 16,
                 cache_dir: str | None = None, parallel=None, kv_host_gb: float = 4.0,
                 kv_threshold: float = 0.25, distributed: bool | None = None):
        self.model_name = model
        self.is_main = True
        if distributed is None:      # None: distributed under a launcher (WORLD_SIZE > 1) or with `parallel`
            distributed = parallel is not None or _launched_world_size() > 1
        elif not distributed and parallel is not None:
            raise ValueError("LLM: parallel= needs distributed=True (or None)")
        if distributed:
            self._setup_distributed(model, dtype, max_model_len, max_num_seqs, max_num_batched_tokens,
                                    kv_cache_gb, block_size, cache_dir, parallel, kv_host_gb, kv_threshold)
            return
        loaded = load_model(model, dtype=dtype, cache_dir=cache_dir)
        self.model_folder = loaded.folder
        self.layouts = None
        self._setup(loaded.hf_model, loaded.tokenizer, loaded.config, max_model_len, max_num_seqs,
                    max_num_batched_tokens, kv_cache_gb, block_size)

    def _setup_distributed(self, model, dtype, max_model_len, max_num_seqs, max_num_batched_tokens,
                           kv_device_gb, block_size, cache_dir, parallel, kv_host_gb, threshold):
        from transformers import AutoTokenizer
        from seesaw_ds.distributed.builder import build_engine
        import torch.distributed as dist
        self.engine = build_engine(model, dtype, parallel, max_model_len, max_num_seqs, max_num_batched_tokens,
                                   block_size, kv_device_gb, kv_host_gb, threshold, cache_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.engine.model_folder)
        except (OSError, ValueError, TypeError, AttributeError):
            self.tokenizer = None
        if self.tokenizer is not None:
            self.engine.detokenize = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        self.config, self.model_folder, self.layouts = self.engine.config, self.engine.model_folder, self.engine.layouts
        self.is_main = dist.get_rank() == 0

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, **kwargs) -> "LLM":
        """Wrap an already-built transformers model (tests, notebooks)."""
        self = cls.__new__(cls)
        self.model_name = getattr(hf_model.config, "_name_or_path", "") or "in-memory"
        self.model_folder = None
        self.is_main, self.layouts = True, None
        self._setup(hf_model.eval(), tokenizer, ModelConfig.from_hf(hf_model.config), **kwargs)
        return self

    def _setup(self, hf_model, tokenizer, config: ModelConfig, max_model_len=2048, max_num_seqs=256,
               max_num_batched_tokens=8192, kv_cache_gb=2.0, block_size=16):
        self.config = config
        self.tokenizer = tokenizer
        self.dtype = hf_model.dtype
        max_model_len = min(max_model_len, config.max_position)
        spec = KVPoolSpec.from_budget(config, int(kv_cache_gb * (1 << 30)), block_size, self.dtype)
        self.pool = KVPool(spec)
        sched = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, block_size),
                          spec.num_blocks)
        executor = LocalExecutor(ModelRunner(hf_model), self.pool)
        detok = (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None
        self.engine = LLMEngine(sched, executor, executor, config.eos_token_ids or _tokenizer_eos(tokenizer),
                                detok, config.sliding_window)

    def metrics(self) -> dict:
        """Cumulative engine numbers: steps, tokens and seconds per stage; switches and KV bytes moved under
        the distributed engine."""
        return self.engine.stats.summary()

    # ---- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: PromptLike) -> tuple[list[int], str | None]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return [int(t) for t in prompt["prompt_token_ids"]], None
        if isinstance(prompt, dict) and "prompt" in prompt:
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            self._need_tokenizer()
            return self.tokenizer.encode(prompt, add_special_tokens=True), prompt
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            self._need_tokenizer()
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(t) for t in ids], None
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt], None
        raise TypeError(f"unsupported prompt of type {type(prompt).__name__}: expected a string, token ids, "
                        f"chat messages or a dict with 'prompt'/'prompt_token_ids'")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this LLM has no tokenizer: pass token ids")

    @staticmethod
    def _as_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, (list, tuple)) and prompts and (
                isinstance(prompts[0], int) or (isinstance(prompts[0], dict) and "role" in prompts[0])):
            return [prompts]                        # one token-id prompt or one chat
        return list(prompts)

    # ---- generation ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = self._as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        texts: dict[str, str | None] = {}
        base = f"gen{self._calls}-"
        self._calls += 1
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids, text = self.encode_prompt(prompt)
            self.engine.add_request(f"{base}{i}", ids, p)
            texts[f"{base}{i}"] = text
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="generate", disable=not (use_tqdm and self.is_main))
        while self.engine.has_unfinished():
            for out in self.engine.step():
                out.prompt = texts[out.request_id]
                results[out.request_id] = out
                bar.update(1)
        bar.close()
        return [results[f"{base}{i}"] for i in range(len(prompts))]


def _tokenizer_eos(tokenizer) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return () if eos is None else (int(eos),)


__all__ = ["LLM", "SamplingParams", "parse_dtype"]
