"""Fused element-wise ops for the decoder layers' norms and MLP activation (bf16 on CPU).

transformers' `LlamaRMSNorm` makes eight passes over memory (to fp32, pow, sum, div, add, rsqrt, mul, to
bf16, mul) and `LlamaMLP` two for `act(gate) * up`; the compiled `rms_norm` and `silu_mul` make one, with
the same rounding steps (tests/kv/test_layer_ops.py compares bits). They are used only inside an engine
forward (`in_engine_forward()`), so `generate` on the same model object still runs transformers' own code.
"""
from __future__ import annotations

import types

import torch

from seesaw_ds.kv.attention import in_engine_forward
from seesaw_ds.kv.native import layer_ops

NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}


def _usable(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and in_engine_forward()


def _norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    ops = layer_ops()
    if ops is None or not _usable(hidden_states) or self.weight.dtype != torch.bfloat16:
        return type(self).forward(self, hidden_states)
    return ops[0](hidden_states, self.weight, float(self.variance_epsilon))   # [..., N]


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    ops = layer_ops()
    if ops is None or not _usable(x):
        return type(self).forward(self, x)
    return self.down_proj(ops[1](self.gate_proj(x), self.up_proj(x)))        # [..., I] -> [..., N]


def use_fused_layer_ops(hf_model) -> int:
    """Point the decoder layers' RMSNorm and SiLU-MLP modules at the fused ops; returns how many."""
    silu = getattr(hf_model.config, "hidden_act", None) in ("silu", "swish")
    count = 0
    for module in hf_model.modules():
        name = type(module).__name__
        if name in NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
        elif name in MLPS and silu:
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        count += 1
    return count
