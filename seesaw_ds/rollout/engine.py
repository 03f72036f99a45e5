"""Rollout generation from a live DeepSpeed training engine, on the training job's own ranks.

    engine, *_ = deepspeed.initialize(model=policy, optimizer=..., config=ds_config)    # ZeRO 0-3
    rollout = RolloutEngine(engine, tokenizer)                                 # one process per rank
    rollout = RolloutEngine(engine, tokenizer, model=folder, parallel={"prefill": {"pp": 2}, "decode": {"tp": 2}})
    with rollout.generating():            # syncs the trainer's weights in, allocates the KV tiers
        outs = rollout.generate(prompts, SamplingParams(temperature=1.0, max_tokens=64, logprobs=0), n=8)
    # outside: the KV pool and host store hold no memory; the weights stay (synced again on the next entry)

Without `parallel`, every training rank holds its own one-process inference engine (a data-parallel
replica: it generates its own prompts), built in memory from the trainer's model config. With `parallel`,
the ranks form one engine in that layout (TP2, PP2 -> TP2, ...), built from `model` (the checkpoint the
trainer started from: only its config and initial bytes; the first sync replaces the weights), and every
rank gets the same outputs.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from seesaw_ds.engine.config import EngineConfig
from seesaw_ds.engine.sampling_params import SamplingParams, sample_seed
from seesaw_ds.rollout.kv_memory import KVMemory, rss_bytes
from seesaw_ds.rollout.sync import DEFAULT_BUCKET_BYTES, SyncReport, WeightSync, strip_wrapper_prefix

log = logging.getLogger("seesaw_ds")


@dataclass
class Sample:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None       # the sampled tokens' log-probabilities (params.logprobs set)
    seed: int | None = None


@dataclass
class RolloutOutput:
    prompt_token_ids: list[int]
    prompt: str | None
    samples: list[Sample] = field(default_factory=list)


def _samples_of(out, decode: Callable[[list[int]], str]) -> list[Sample]:
    """A finished request's n samples, each with its text on every rank: the engine's own text where it
    decoded one (rank 0), else `decode` of the token ids (the other ranks, where the engine leaves it empty;
    an empty decode on rank 0 is decoded again, to the same empty text)."""
    return [Sample(list(s.token_ids), s.text or decode(s.token_ids), s.finish_reason, s.token_logprobs)
            for s in out.samples]


def _empty_hf_model(module: torch.nn.Module, dtype: torch.dtype):
    """A transformers model with the trainer's config and uninitialised weights of `dtype` (the first sync
    writes them): parameters built on the meta device, then given storage; buffers built normally."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(module.config, dtype=dtype)
    state = {n: torch.zeros(p.shape, dtype=dtype) for n, p in model.named_parameters()}
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class RolloutEngine:
    def __init__(self, trainer, tokenizer=None, *, parallel: dict | str | None = None, model: str | None = None,
                 dtype: torch.dtype | str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 atomic: bool = True, name_map: Callable[[str], str | None] = strip_wrapper_prefix,
                 **engine_settings: Any):
        """`trainer`: a DeepSpeed engine (or a plain module); `engine_settings`: EngineConfig fields
        (kv_device_gb, kv_host_gb, block_size, max_model_len, max_num_seqs, ...)."""
        from seesaw_ds.distributed.builder import build_engine
        from seesaw_ds.engine.comm import NullComm, TorchComm
        from seesaw_ds.models.config import parse_dtype

        self.trainer = trainer
        self.module = getattr(trainer, "module", trainer)
        self.name_map = name_map
        if isinstance(dtype, str):
            dtype = parse_dtype(dtype)
        dtype = dtype or _param_dtype(self.module)
        if parallel is None:
            comm = NullComm()
            hf_model = _empty_hf_model(self.module, dtype)
            name = getattr(self.module.config, "_name_or_path", "") or "trainer"
            config = EngineConfig(model=name, **engine_settings)
            self.engine = build_engine(config, comm=comm, tokenizer=tokenizer, hf_model=hf_model)
        else:
            if model is None:
                raise ValueError("RolloutEngine: parallel= needs model= (the checkpoint the trainer started "
                                 "from: the layouts are built from it, then the first sync replaces its weights)")
            comm = TorchComm()
            dtype_name = str(dtype).replace("torch.", "")
            config = EngineConfig(model=model, parallel=parallel, dtype=dtype_name, **engine_settings)
            self.engine = build_engine(config, comm=comm, tokenizer=tokenizer)
        self.comm = comm
        self.tokenizer = tokenizer if tokenizer is not None else self.engine.tokenizer
        self.kv = KVMemory(self.engine)
        self.kv.release()
        self.weight_sync = WeightSync(self.engine.weights, comm, bucket_bytes, atomic)
        self.memory: dict[str, int] = {}       # RSS in bytes: before / inside / after the last generating()
        self.last_generate: dict[str, float] = {}
        self._calls = 0

    # ---- weights and memory ----------------------------------------------------------------------------
    def sync_weights(self) -> SyncReport:
        """The trainer's current parameters into the rollout weights (collective over the training ranks)."""
        report = self.weight_sync.sync(self.module, self.name_map)
        stats = self.engine.stats
        stats.weight_updates += 1
        stats.weight_update_bytes += report.nbytes
        stats.weight_update_s += report.seconds
        return report

    @contextmanager
    def generating(self, sync: bool = True):
        """Sync the weights (unless `sync=False`) and allocate the KV tiers; free them on exit."""
        self.memory = {"before": rss_bytes()}
        try:
            if sync:
                self.sync_weights()
            self.kv.acquire()
            self.memory["inside"] = rss_bytes()
            yield self
        finally:
            self._drain()
            self.kv.release()
            self.memory["after"] = rss_bytes()

    def _drain(self) -> None:
        self.engine.abort_all()

    # ---- generation ------------------------------------------------------------------------------------
    def _encode(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return [int(t) for t in prompt["prompt_token_ids"]], prompt.get("prompt")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this rollout engine has no tokenizer: pass token ids")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]), prompt
        return [int(t) for t in prompt], None

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    @torch.inference_mode()
    def generate(self, prompts: list, params: SamplingParams | None = None, n: int | None = None
                 ) -> list[RolloutOutput]:
        """Per prompt, `n` samples (default `params.n`): token ids, text,
        finish reason, and the sampled tokens' logprobs when `params.logprobs` is set. Every rank calls it
        with the same prompts (one engine over the ranks) or its own (one engine per rank); every rank
        gets the outputs (the engine broadcasts each step's tokens)."""
        if not self.kv.held:
            raise RuntimeError("generate() runs inside `with rollout.generating():`")
        params = params or SamplingParams()
        n = params.n if n is None else n
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        t0 = time.perf_counter()
        base = f"rollout{self._calls}-"
        self._calls += 1
        encoded = [self._encode(p) for p in prompts]
        for i, (ids, _) in enumerate(encoded):       # one request of n samples: the prompt prefilled once
            self.engine.add_request(f"{base}{i}", ids, replace(params, n=n))
        done = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                done[out.request_id] = out
        outputs = []
        tokens = 0
        for k, (ids, text) in enumerate(encoded):
            row = RolloutOutput(ids, text, _samples_of(done[f"{base}{k}"], self._text))
            for i, sample in enumerate(row.samples):
                sample.seed = sample_seed(params.seed, i)
                tokens += len(sample.token_ids)
            outputs.append(row)
        dt = time.perf_counter() - t0
        self.last_generate = {"seconds": dt, "tokens": float(tokens), "tokens_per_s": tokens / max(dt, 1e-9)}
        return outputs

    def close(self) -> None:
        self.weight_sync.close()
        self.engine.close()

    def __enter__(self) -> "RolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
