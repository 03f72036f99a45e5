"""The engine's settings: one frozen record from the recipe (or `LLM(...)` keyword arguments) to the builder.

Names follow the recipe: `engine.kv.device_gb` is `kv_device_gb`, `engine.kv.host_gb` is `kv_host_gb`,
`engine.kv.threshold` is `kv_threshold`, `engine.allow_cross_node_tp` is `allow_cross_node_tp`; `parallel` is the
recipe's `parallel` value (or a `StageLayouts`).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str = "embedded:smollm2"   # HF folder, hub id, .gguf file or embedded:NAME
    dtype: str = "auto"               # auto: bf16 where the hardware has native bf16, else fp32
    parallel: Any = None              # None / "seesaw": PP prefill -> TP decode over the launched ranks
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    kv_device_gb: float = 2.0         # per rank: the paged device pool
    kv_host_gb: float = 4.0           # per node: the host KV store (layout pairs that switch only)
    kv_threshold: float = 0.25        # host-store fill fraction at which decode hands back to prefill
    cache_dir: str | None = None      # converted models and master copies (default: SEESAW_CACHE)
    micro_batches: int = 0            # 0: the stage executor's own choice
    stash_async: bool | None = None   # None: on accelerators only (a stash thread takes a CPU core)
    allow_cross_node_tp: bool = False  # True: a TP group may span nodes (its all-reduces cross their link)
    decode_in_flight: bool = True     # static PP decode keeps pp micro-batches in flight across steps
    #                                   (False: one DeepSpeed pipeline pass per step, which fills and drains)

    def __post_init__(self):
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("kv_device_gb", "kv_host_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"kv.{name[3:]} must be a positive number of GB, got {value!r}")
        if not 0.0 <= self.kv_threshold < 1.0:
            raise ValueError(f"kv.threshold must be in [0, 1), got {self.kv_threshold!r}")
        for name in ("allow_cross_node_tp", "decode_in_flight"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.micro_batches < 0:
            raise ValueError(f"micro_batches must be >= 0, got {self.micro_batches!r}")
