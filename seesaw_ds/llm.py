"""The offline Python API, in the shape vLLM users know:

    llm = LLM(model="embedded:smollm2", dtype="bfloat16")
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
"""
from __future__ import annotations

import os
from typing import Any, Sequence as Seq

import torch
from tqdm.auto import tqdm

from seesaw_ds.engine.config import EngineConfig
from seesaw_ds.engine.sampling_params import SamplingParams
from seesaw_ds.engine.sequence import RequestOutput
from seesaw_ds.models.config import parse_dtype

PromptLike = Any   # str | list[int] | list[{"role", "content"}] | {"prompt": str} | {"prompt_token_ids": [...]}


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class LLM:
    """The engine behind a vLLM-shaped API. `LLM(model, **settings)` takes the `EngineConfig` fields (the
    recipe's names: `kv_device_gb`, `kv_host_gb`, `kv_threshold`, `parallel`, ...). Under a launcher
    (WORLD_SIZE > 1) or with `parallel=` given, every rank constructs the LLM and calls `generate` with the
    same prompts; outputs are complete on rank 0 (`is_main`). `distributed=False` runs one process per rank
    (data-parallel replicas). Use as a context manager, or call `close()`."""
    _calls = 0

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 distributed: bool | None = None, announce=None, **settings):
        if config is None:
            config = EngineConfig(model=model, **settings) if model is not None else EngineConfig(**settings)
        elif model is not None or settings:
            raise ValueError("LLM: give either config= or the model and settings, not both")
        self.engine_config = config
        if distributed is None:      # None: distributed under a launcher (WORLD_SIZE > 1) or with `parallel`
            distributed = config.parallel is not None or _launched_world_size() > 1
        elif not distributed and config.parallel is not None:
            raise ValueError("LLM: parallel= needs distributed=True (or None)")
        from seesaw_ds.distributed.builder import build_engine, init_distributed, leave_distributed, share_cores
        from seesaw_ds.engine.comm import NullComm, TorchComm
        self._owns_process_group = init_distributed() if distributed else False
        if self._owns_process_group:
            share_cores()
        comm = TorchComm() if distributed else NullComm()
        self.is_main = comm.rank == 0
        self.engine = build_engine(config, comm=comm, announce=announce)
        self.tokenizer = self.engine.tokenizer
        self._leave = leave_distributed if self._owns_process_group else None
        self.model_name = config.model

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, **settings) -> "LLM":
        """Wrap an already-built transformers model (tests, notebooks): one process, its tensors as the
        master copy (`update_weights` writes into them)."""
        from seesaw_ds.distributed.builder import build_engine
        from seesaw_ds.engine.comm import NullComm
        self = cls.__new__(cls)
        self.model_name = getattr(hf_model.config, "_name_or_path", "") or "in-memory"
        self.engine_config = EngineConfig(model=self.model_name, **settings)
        self.is_main, self.tokenizer, self._owns_process_group, self._leave = True, tokenizer, False, None
        self.engine = build_engine(self.engine_config, comm=NullComm(), tokenizer=tokenizer, hf_model=hf_model)
        return self

    @property
    def config(self):
        """The model's normalised config (ModelConfig)."""
        return self.engine.model_config

    @property
    def layouts(self):
        return self.engine.layouts

    @property
    def model_folder(self) -> str | None:
        return self.engine.model_folder

    def metrics(self) -> dict:
        """Cumulative engine numbers: steps, tokens and seconds per stage, switches and KV bytes moved."""
        return self.engine.stats.summary()

    def update_weights(self, weights) -> int:
        """New weights for the next `generate` (a state_dict or (name, tensor) pairs; see Engine)."""
        return self.engine.update_weights(weights)

    def close(self) -> None:
        """Release the engine (threads, KV tiers, private weights); idempotent. A process group this LLM
        created is destroyed; one that existed before is left as it was."""
        self.engine.close()
        if self._leave is not None:
            leave, self._leave = self._leave, None
            leave()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        """One RequestOutput per prompt, in order. With `SamplingParams(n=N)` the prompt is prefilled once and
        `output.samples` holds its N samples (token ids, text, finish reason and, with `logprobs` set, each
        sampled token's log-probability in `token_logprobs`); the flat fields are sample 0's."""
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


__all__ = ["LLM", "SamplingParams", "parse_dtype"]
