"""The lean decode path: each decoder layer's ops called directly, with the step's metadata resolved once.

A decode step through transformers' modules pays, per layer, for nn.Module dispatch of a dozen modules,
the attention-interface lookup, the attention hook's context lookups, AutoTP's autograd-Function wrappers
and, per linear, the wrapper's checks. `LeanDecoder.run` computes the same thing with the same tensors:

    x = norm1(h); q, k, v = q_proj(x), k_proj(x), v_proj(x); rope(q, k); write k, v to the pool
    h = h + o_proj(paged_attention(q))            (row-parallel: all-reduce, exactly as AutoTP's)
    h = h + down_proj(act(gate_proj(norm2(h))) * up_proj(norm2(h)))

Each linear runs the very expression its module's forward runs (F.linear for nn.Linear; for AutoTP's
wrappers the matmul, then `deepspeed.comm.inference_all_reduce` for a row-parallel LinearAllreduce, then
the bias), reading the module's weight at call time, so AutoTP's shards and the whole-model views stay the
weights of record (a re-bind after `update_weights` is seen at once). Rotary embedding is transformers' own
function, the norms and activation the fused ops of models/fused.py: greedy tokens are identical to the
module path (tests/models/test_decode_path.py compares logits bit for bit). Modules of an unknown kind are
called as modules. With bf16 weights on a CPU, the linears run as matmuls over packed copies of the
weights instead (models/packed_linear.py: q/k/v as one, gate/up as one, and the LM head), whose copies follow
the weights of record, and rope + the K/V cache writes run as one op over the q/k/v matmul's output.
`SEESAW_DS_LEAN_DECODE=0` turns the lean path off.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F

from seesaw_ds.kv.attention import AttentionMetadata, decode_attention
from seesaw_ds.kv.native import env_switch, layer_ops, paged_decode_op
from seesaw_ds.models.packed_linear import PackedLinear, packable, packing_enabled

LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def lean_decode_enabled() -> bool:
    return env_switch("SEESAW_DS_LEAN_DECODE")


def _autotp_kind(module):
    """For DeepSpeed AutoTP's linear wrappers in a mode we reproduce: ("column", None) or ("row",
    all_reduce(out)); None for anything else."""
    try:
        from deepspeed.module_inject import layers as tp
    except ImportError:
        return None
    kind = type(module)
    if kind not in (tp.LinearLayer, tp.LinearAllreduce) or module.is_training_mode() or \
            getattr(module, "defer_collectives_to_compiler", False):
        return None
    if kind is tp.LinearLayer:
        if kind.tp_overlap_comm or getattr(module, "gather_output", False):
            return None
        return "column", None
    return "row", tp_all_reduce(module)


def tp_all_reduce(module):
    """The in-place all-reduce a row-parallel AutoTP linear runs on its output; None on a group of one."""
    from deepspeed.comm import inference_all_reduce, pg_utils
    group = module.mp_group
    return (lambda out: inference_all_reduce(out, group=group)) if pg_utils.is_parallel(group) else None


def linear_call(module):
    """The cheapest call that computes exactly what `module(x)` computes: the same expression as its
    forward (nn.Linear: F.linear; AutoTP: matmul, the row-parallel all-reduce, then the bias)."""
    if type(module) is torch.nn.Linear:
        return lambda x: F.linear(x, module.weight, module.bias)
    kind = _autotp_kind(module)
    if kind is None:
        return module
    from deepspeed.module_inject.layers import add_bias
    all_reduce = kind[1]

    def call(x):
        out = torch.matmul(x, module.weight.transpose(-1, -2))
        if all_reduce is not None:
            all_reduce(out)
        return add_bias(out, module.bias)
    return call


def packed_call(modules) -> PackedLinear | None:
    """One packed matmul for `modules` (all nn.Linear, all AutoTP column-parallel, or one row-parallel
    AutoTP linear), or None where the packed path does not apply (see models/packed_linear.py)."""
    if not packable(modules):
        return None
    if all(type(m) is torch.nn.Linear for m in modules):
        return PackedLinear(modules)
    kinds = [_autotp_kind(m) for m in modules]
    if any(k is None for k in kinds):
        return None
    if all(k[0] == "column" for k in kinds):
        return PackedLinear(modules)
    if len(modules) == 1:
        return PackedLinear(modules, all_reduce=kinds[0][1])
    return None


def packed_head(lm_head):
    """The LM head as a packed matmul: a whole nn.Linear, or AutoTP's `LmHeadLinearAllreduce` (each rank holds
    a slice of the hidden columns: its slice of the input, the matmul, the all-reduce of the partial logits,
    then the bias, as its forward); None where neither applies. The callable has the PackedLinear's
    `release()` and `nbytes`."""
    try:
        from deepspeed.module_inject.layers import LmHeadLinearAllreduce
    except ImportError:
        LmHeadLinearAllreduce = None
    if LmHeadLinearAllreduce is None or type(lm_head) is not LmHeadLinearAllreduce:
        return packed_call([lm_head])
    sizes, index = getattr(lm_head, "_partition_sizes", None), getattr(lm_head, "tp_index", None)
    if sizes is None or index is None or lm_head.is_training_mode() or not packable([lm_head]):
        return None
    return _SlicedInput(PackedLinear([lm_head], all_reduce=tp_all_reduce(lm_head)), sum(sizes[:index]), sizes[index])


class _SlicedInput:
    """x [..., H] -> linear(x[..., start:start + size])."""

    def __init__(self, linear: PackedLinear, start: int, size: int):
        self.linear, self.start, self.size = linear, start, size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x[..., self.start:self.start + self.size].contiguous())

    def release(self) -> None:
        self.linear.release()

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes


def _norm_call(module, fused):
    if fused is not None and getattr(module, "weight", None) is not None and \
            module.weight.dtype == torch.bfloat16 and hasattr(module, "variance_epsilon"):
        eps = float(module.variance_epsilon)

        def norm(x):
            if x.dtype == torch.bfloat16 and x.device.type == "cpu":
                return fused(x, module.weight, eps)
            return type(module).forward(module, x)
        return norm
    return lambda x: type(module).forward(module, x)


class LeanLayer:
    """One decoder layer's ops, resolved once."""

    def __init__(self, layer, rope, fused, packed: bool = False):
        attn, mlp = layer.self_attn, layer.mlp
        self.index = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = float(attn.scaling)
        self.rope = rope
        self.norm1 = _norm_call(layer.input_layernorm, fused[0] if fused else None)
        self.norm2 = _norm_call(layer.post_attention_layernorm, fused[0] if fused else None)
        self.q, self.k, self.v, self.o = (linear_call(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.gate, self.up, self.down = (linear_call(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        self.act_fn = mlp.act_fn
        self.silu_mul = fused[1] if fused and _is_silu(mlp) else None
        self.packed = _packed_linears(attn, mlp) if packed else None
        if self.packed:           # [..., H] -> (q, k, v) and (gate, up) from one matmul each
            self.qkv, self.gate_up = _split_call(self.packed["qkv"]), _split_call(self.packed["gate_up"])
            self.o, self.down = self.packed["o"], self.packed["down"]
        else:
            self.qkv = lambda x: (self.q(x), self.k(x), self.v(x))
            self.gate_up = lambda x: (self.gate(x), self.up(x))
        # q/k/v's one matmul straight into rope and the cache writes (bf16 caches; the modules' rounding)
        self.rope_kv_write = fused[2] if fused and self.packed else None
        self.heads = self.packed["qkv"].sizes[0] // self.head_dim if self.packed else 0

    def release_packed(self) -> None:
        for linear in (self.packed or {}).values():
            linear.release()

    def act_mul(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.silu_mul is not None and g.dtype == torch.bfloat16:
            return self.silu_mul(g, u)
        return self.act_fn(g) * u

    def __call__(self, h, cos, sin, meta: AttentionMetadata, kv, op):
        """h [1, B, H] -> [1, B, H] (B sequences, one new token each)."""
        b, d = h.shape[1], self.head_dim
        x = self.norm1(h)
        k_cache, v_cache = kv.layer(self.index)                           # [blocks, block_size, Hkv, D]
        if self.rope_kv_write is not None and k_cache.dtype == torch.bfloat16 and x.dtype == torch.bfloat16:
            qkv = self.packed["qkv"](x)                                   # [1, B, (Hq + 2 Hkv) * D]
            q = self.rope_kv_write(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, self.heads,
                                   k_cache.shape[2])                      # [B, Hq, D]
        else:
            q, k, v = (t.view(1, b, -1, d) for t in self.qkv(x))         # [1, B, Hq|Hkv, D]
            q, k = self.rope(q, k, cos, sin, unsqueeze_dim=2)             # element-wise: same bits as [1, H, B, D]
            kv.write(self.index, k.transpose(1, 2), v.transpose(1, 2), meta.slot_mapping)
            q = q[0]
        attn = decode_attention(q, k_cache, v_cache, meta, self.scaling, op)      # [B, Hq, D]
        h = h + self.o(attn.reshape(1, b, -1))
        x = self.norm2(h)
        return h + self.down(self.act_mul(*self.gate_up(x)))


def _packed_linears(attn, mlp) -> dict[str, PackedLinear] | None:
    """q/k/v as one packed matmul, o, gate/up as one, down; None unless all four apply."""
    groups = {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "o": (attn.o_proj,),
              "gate_up": (mlp.gate_proj, mlp.up_proj), "down": (mlp.down_proj,)}
    packed = {name: packed_call(modules) for name, modules in groups.items()}
    return None if any(p is None for p in packed.values()) else packed


def _split_call(linear: PackedLinear):
    return lambda x: linear.split(linear(x))


def _is_silu(mlp) -> bool:
    cfg = getattr(mlp, "config", None)
    return getattr(cfg, "hidden_act", None) in ("silu", "swish")


class LeanDecoder:
    """The decode path over a runner's layers; `supported` is False when a layer is of a kind it does not
    know (then the runner keeps transformers' modules). `weights_key` names the weights' current content
    (the master copy's key): when it changes, every packed copy is dropped and made again on next use."""

    def __init__(self, layers, lm_head=None, weights_key: Callable[[], str] = lambda: ""):
        self.supported = all(type(layer).__name__ in LAYERS for layer in layers)
        self.weights_key = weights_key
        self._layers = layers
        self._lm_head = lm_head
        self._lean: list[LeanLayer] | None = None
        self._head: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._key: str | None = None

    def _build(self) -> None:
        fused = layer_ops()
        rope = getattr(sys.modules[type(self._layers[0].self_attn).__module__], "apply_rotary_pos_emb")
        rope = getattr(rope, "seesaw_original", rope)     # decode's [1, B, H, D] rope: never models/fused.py's
        packed = packing_enabled()
        self._lean = [LeanLayer(layer, rope, fused, packed) for layer in self._layers]
        self._head = self._packed_head()

    def _packed_head(self):
        return packed_head(self._lm_head) if self._lm_head is not None and packing_enabled() else None

    def _follow_weights(self) -> None:
        if self._lean is None:
            self._build()
        key = self.weights_key()
        if key != self._key:
            self.release_packed()
            self._key = key

    def set_head(self, lm_head) -> None:
        """Project with `lm_head` from now on (a vocabulary-parallel head's rows, models/vocab_head.py)."""
        if self._head is not None:
            self._head.release()
        self._lm_head = lm_head
        self._head = self._packed_head() if self._lean is not None else None     # else: made by _build

    def head(self, h: torch.Tensor) -> torch.Tensor | None:
        """lm_head(h) [..., H] -> [..., V] over a packed copy of its weight; None where the head is not packed."""
        self._follow_weights()
        return self._head(h) if self._head is not None else None

    def run(self, h: torch.Tensor, cos_sin, layers: range, meta: AttentionMetadata, kv) -> torch.Tensor:
        self._follow_weights()
        cos, sin = cos_sin
        op = paged_decode_op() if h.device.type == "cpu" else None
        for i in layers:
            h = self._lean[i](h, cos, sin, meta, kv, op)
        return h

    def release_packed(self) -> None:
        """Drop the packed weight copies (made again on next use)."""
        for layer in self._lean or ():
            layer.release_packed()
        if self._head is not None:
            self._head.release()

    @property
    def packed_bytes(self) -> int:
        head = self._head.nbytes if self._head is not None else 0
        return head + sum(p.nbytes for layer in self._lean or () for p in (layer.packed or {}).values())
