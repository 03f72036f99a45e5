"""Decode's linear layers as matmuls over pre-packed bf16 weights (CPU).

torch's bf16 `F.linear` on a CPU lays the weight out again in oneDNN's blocked format on every call; at a
decode step's few dozen rows that relayout costs as much as the matmul. A `PackedLinear` keeps one packed
copy of one or more linears' weights, concatenated along the output so q/k/v run as one matmul and
gate/up as another:

    x [..., K] -> out [..., N1 + N2 + ...]        split(out) -> ([..., N1], [..., N2], ...)

Two kernels: the project's own (kv/csrc/decode_linear.cpp: on the tile unit (AMX) or with AVX512-BF16 dot
products; each weight byte streamed once by one thread; input widths that are multiples of 32), else
oneDNN's matmul over its own packed layout (`mkldnn._linear_pointwise`), whose threads split a decode step's
few rows less well. Both accumulate in fp32 and round once; their low bits differ from
`F.linear`'s, so the packed path is used for bfloat16 only, where batch composition already changes low
bits; float32 keeps `F.linear` (token identity with Hugging Face's `generate` is tested there).
`SEESAW_DS_PACKED_LINEAR=0` turns packing off, `SEESAW_DS_NATIVE_LINEAR=0` keeps oneDNN's kernel.

The copy is derived, not owned: it is made on first use and made again whenever a source weight or bias is
re-bound (new storage) or written in place (its version counter moves); `release()` drops it (the decode
path also drops every copy when the master copy's key changes, which covers writes made by another rank
into shared memory). The modules' weights stay the weights of record. Row-parallel AutoTP linears
all-reduce the matmul's output and add their bias after it, exactly as their forward does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from seesaw_ds.kv.native import env_switch, linear_ops


def packing_enabled() -> bool:
    """The switch is on and one of the two kernels is here."""
    if not env_switch("SEESAW_DS_PACKED_LINEAR"):
        return False
    return linear_ops() is not None or _onednn_available()


def _onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
                and hasattr(ops, "_reorder_linear_weight") and bool(ops._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


def packable(modules: Sequence[torch.nn.Module]) -> bool:
    """Every module has a 2-D bf16 CPU weight of one input width that a kernel here takes, and all or none
    have a bias."""
    weights = [getattr(m, "weight", None) for m in modules]
    if any(w is None or w.dim() != 2 or w.dtype != torch.bfloat16 or w.device.type != "cpu" for w in weights):
        return False
    if len({w.shape[1] for w in weights}) != 1:
        return False
    if weights[0].shape[1] % 32 != 0 and not _onednn_available():      # the tile kernel's input widths only
        return False
    return len({getattr(m, "bias", None) is None for m in modules}) == 1


class PackedLinear:
    """One matmul over the concatenated, packed weights of `modules` (see the module docstring).
    `all_reduce(out)` (in place) is given for a row-parallel linear, whose bias is added after it."""

    def __init__(self, modules: Sequence[torch.nn.Module], all_reduce: Callable[[torch.Tensor], None] | None = None):
        self.modules = list(modules)
        self.sizes = [m.weight.shape[0] for m in self.modules]
        self.all_reduce = all_reduce
        self._packed: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None          # passed to the matmul (column-parallel or whole)
        self._bias_after: torch.Tensor | None = None    # added after the all-reduce (row-parallel)
        self._source: tuple | None = None
        self._matmul: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _signature(self) -> tuple:
        tensors = [t for m in self.modules for t in (m.weight, getattr(m, "bias", None)) if t is not None]
        # an inference tensor keeps no version counter: only a re-bind is seen for it
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)

    def _pack(self) -> None:
        weights = [m.weight.detach() for m in self.modules]
        weight = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights)   # [N, K]
        biases = [m.bias for m in self.modules if getattr(m, "bias", None) is not None]
        bias = None if not biases else (biases[0] if len(biases) == 1 else torch.cat(biases)).detach().clone()
        self._bias, self._bias_after = (None, bias) if self.all_reduce is not None else (bias, None)
        native = linear_ops()
        if native is not None and weight.shape[1] % 32 == 0:
            pack, linear = native
            self._packed, n = pack(weight), weight.shape[0]             # [ceil(N / 16), K / 2, 16, 2]
            self._matmul = lambda x: linear(x, self._packed, self._bias, n)
        else:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self._matmul = lambda x: torch.ops.mkldnn._linear_pointwise(x, self._packed, self._bias, "none", [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        signature = self._signature()
        if signature != self._source:
            self._pack()
            self._source = signature
        out = self._matmul(x)
        if self.all_reduce is not None:
            self.all_reduce(out)
            if self._bias_after is not None:
                out += self._bias_after
        return out

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., sum(sizes)] -> one view per module."""
        return out.split(self.sizes, dim=-1)

    def release(self) -> None:
        self._packed = self._bias = self._bias_after = self._source = self._matmul = None

    @property
    def nbytes(self) -> int:
        return 0 if self._packed is None else self._packed.numel() * self._packed.element_size()
