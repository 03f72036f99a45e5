"""Fused element-wise ops for the decoder layers' norms, rotary embedding and MLP activation (bf16 on CPU).

transformers' `LlamaRMSNorm` makes eight passes over memory (to fp32, pow, sum, div, add, rsqrt, mul, to
bf16, mul), `apply_rotary_pos_emb` six per tensor (two multiplies, a slice, a negation, a concatenation,
an add) and `LlamaMLP` two for `act(gate) * up`; the compiled `rms_norm`, `rope` and `silu_mul` make one,
with the same rounding steps (tests/kv/test_layer_ops.py compares bits). They are used only inside an
engine forward (`in_engine_forward()`), so `generate` on the same model object still runs transformers'
own code.
"""
from __future__ import annotations

import sys
import types

import torch

from seesaw_ds.kv.attention import in_engine_forward
from seesaw_ds.kv.native import layer_ops

MLP_ROWS = 1536      # rows per MLP pass of a long prefill step (`_mlp_forward`)
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
    rows = x.reshape(-1, x.shape[-1])                                           # [T, N]
    if rows.shape[0] <= 2 * MLP_ROWS:
        return self.down_proj(ops[1](self.gate_proj(x), self.up_proj(x)))    # [..., I] -> [..., N]
    # a long prefill in row chunks: rows are independent (the same bits), and a chunk's [rows, I] gate and
    # up outputs stay in the last-level cache, where a whole step's spill to memory and slow the matmuls
    out = [self.down_proj(ops[1](self.gate_proj(part), self.up_proj(part))) for part in rows.split(MLP_ROWS)]
    return torch.cat(out).view(*x.shape[:-1], -1)


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


def _fused_rope(original):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`, over the compiled `rope` where
    it applies (a prefill's [B, H, T, D] q and k in bf16 inside an engine forward), else `original`."""
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
        ops = layer_ops()
        if ops is None or unsqueeze_dim != 1 or not _usable(q) or q.dim() != 4 or k.dim() != 4 \
                or k.dtype != torch.bfloat16 or cos.dtype != torch.bfloat16 or cos.dim() != 3 \
                or cos.shape[-1] != q.shape[-1]:
            return original(q, k, cos, sin, *args, **kwargs)
        return ops[3](q, cos, sin), ops[3](k, cos, sin)
    apply_rotary_pos_emb.seesaw_original = original
    return apply_rotary_pos_emb


def use_fused_rope(hf_model) -> bool:
    """Point the attention modules' `apply_rotary_pos_emb` (a global of their transformers module, looked up
    at call time) at the compiled `rope`; True if it is (or already was). Outside an engine forward the
    original runs, so other users of that module see no change."""
    layers = getattr(getattr(hf_model, "model", None), "layers", None) or []
    attn = getattr(layers[0], "self_attn", None) if len(layers) else None
    module = sys.modules.get(type(attn).__module__) if attn is not None else None
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None or not type(attn).__name__.endswith("Attention"):
        return False
    if not hasattr(original, "seesaw_original"):
        module.apply_rotary_pos_emb = _fused_rope(original)
    return True
