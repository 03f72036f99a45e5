"""One normalised, frozen description of a decoder-only model.

Everything downstream (KV pool sizing, shard plans, the planner) reads this, never the raw HF config.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

# HF `architectures[0]` / `model_type` values whose layer math we run through transformers' own modules.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are only fast on CPUs with native bf16 dot products (AVX512-BF16 or AMX); elsewhere
    they are emulated and run slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype() -> torch.dtype:
    """bfloat16 on accelerators and on CPUs with native bf16; float32 otherwise."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if str(name).lower() == "auto":
        return auto_dtype()
    try:
        return _DTYPES[str(name).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected auto or one of {sorted(_DTYPES)}") from None


class UnsupportedArchitecture(ValueError):
    """A model whose architecture (HF `model_type`) we do not run."""

    @classmethod
    def unless_supported(cls, model_type: Any, architectures: Any = None) -> None:
        """Raise one for a `model_type` outside SUPPORTED_MODEL_TYPES, naming the architecture (the config's
        `architectures[0]`, else the model_type itself) and the supported ones."""
        if model_type in SUPPORTED_MODEL_TYPES:
            return
        arch = architectures[0] if isinstance(architectures, (list, tuple)) and architectures else model_type
        raise cls(f"unsupported architecture {arch!r} (model_type {model_type!r}); "
                  f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str            # "llama" | "mistral" | "qwen2"
    num_layers: int            # L
    hidden_size: int           # H
    intermediate_size: int     # MLP inner width
    num_heads: int             # query heads
    num_kv_heads: int          # key/value heads (GQA when < num_heads)
    head_dim: int              # D
    vocab_size: int
    max_position: int          # max_position_embeddings
    rope_theta: float
    tie_embeddings: bool
    qkv_bias: bool             # Qwen2: q/k/v projections carry a bias
    sliding_window: int | None  # None: full attention
    rms_norm_eps: float
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"     # the checkpoint's dtype name

    def __post_init__(self):
        UnsupportedArchitecture.unless_supported(self.model_type)
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def params_per_layer(self) -> int:
        """W in the throughput model: attention + MLP weights of one decoder layer (norms included)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * d * h
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * self.intermediate_size
        return attn + mlp + 2 * h

    @property
    def embedding_params(self) -> int:
        n = self.vocab_size * self.hidden_size
        return n if self.tie_embeddings else 2 * n

    @property
    def num_params(self) -> int:
        return self.num_layers * self.params_per_layer + self.embedding_params + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for one token across all layers and KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Normalise a transformers `PretrainedConfig` (or a plain dict of one)."""
        get = (lambda k, default=None: hf.get(k, default)) if isinstance(hf, dict) else \
            (lambda k, default=None: getattr(hf, k, default))
        model_type = get("model_type")
        UnsupportedArchitecture.unless_supported(model_type, get("architectures"))
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        theta = get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict) else None) or 10000.0
        eos = get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        window = get("sliding_window")
        if model_type == "qwen2" and not get("use_sliding_window", False):
            window = None
        dtype = get("torch_dtype") or get("dtype") or "float32"
        return cls(
            model_type=model_type,
            num_layers=get("num_hidden_layers"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            vocab_size=get("vocab_size"),
            max_position=get("max_position_embeddings") or 4096,
            rope_theta=float(theta),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=(model_type == "qwen2") or bool(get("attention_bias", False)),
            sliding_window=window,
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            eos_token_ids=eos,
            dtype=str(dtype).replace("torch.", ""),
        )
