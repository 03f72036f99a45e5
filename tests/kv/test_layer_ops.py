"""The fused bf16 layer ops give the same bits as the transformers modules they stand in for."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from seesaw_ds.kv.attention import AttentionMetadata, paged_attention
from seesaw_ds.kv.native import layer_ops
from seesaw_ds.models.fused import use_fused_layer_ops
from tests.conftest import tiny_hf_model


@pytest.fixture(scope="module")
def ops():
    ops = layer_ops()
    if ops is None:
        pytest.skip("the fused layer ops need AVX512-BF16")
    return ops


@pytest.mark.parametrize("hidden", [576, 960, 2048, 4096, 5120, 100, 8])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_bit_identical(ops, hidden, rows):
    g = torch.Generator().manual_seed(hidden + rows)
    x = (torch.randn(1, rows, hidden, generator=g) * 3).bfloat16()
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    norm.weight.data = (torch.rand(hidden, generator=g) * 2).bfloat16()
    got = ops[0](x, norm.weight, 1e-5)
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    assert torch.equal(got, norm(x)), f"{int((got != norm(x)).sum())} of {x.numel()} values differ"


def test_rms_norm_non_contiguous_input(ops):
    x = torch.randn(64, 2, 576).bfloat16()[:, 0]                    # row stride 1152
    norm = LlamaRMSNorm(576, eps=1e-6).bfloat16()
    assert torch.equal(ops[0](x, norm.weight, 1e-6), norm(x))


@pytest.mark.parametrize("shape", [(1, 5, 1536), (300, 1536), (3, 17)])
def test_silu_mul_bit_identical(ops, shape):
    g = torch.Generator().manual_seed(sum(shape))
    gate = (torch.randn(*shape, generator=g) * 4).bfloat16()
    up = torch.randn(*shape, generator=g).bfloat16()
    assert torch.equal(ops[1](gate, up), F.silu(gate) * up)


def test_silu_mul_extremes(ops):
    gate = torch.tensor([-100., -88., -20., -1e-3, 0., 1e-3, 20., 88., 100.] * 2).bfloat16()
    up = torch.full_like(gate, 1.5)
    assert torch.equal(ops[1](gate, up), F.silu(gate) * up)


def test_modules_use_fused_ops_only_inside_an_engine_forward(ops, monkeypatch):
    model = tiny_hf_model().bfloat16()
    assert use_fused_layer_ops(model) == 2 * 3 + 3 + 1              # 2 norms + 1 MLP per layer, final norm
    calls = []
    import seesaw_ds.models.fused as fused
    monkeypatch.setattr(fused, "layer_ops", lambda: (lambda *a: calls.append("norm") or ops[0](*a),
                                                     lambda *a: calls.append("mlp") or ops[1](*a)))
    layer = model.model.layers[0]
    x = torch.randn(1, 4, 96).bfloat16()
    reference = type(layer.mlp).forward(layer.mlp, x)
    assert torch.equal(layer.mlp(x), reference) and calls == []     # plain transformers outside
    meta = AttentionMetadata(True, torch.zeros(4, dtype=torch.long), [0, 4], None, None)
    with paged_attention(meta, None):
        assert torch.equal(layer.mlp(x), reference)
        assert torch.equal(layer.input_layernorm(x), type(layer.input_layernorm).forward(layer.input_layernorm, x))
    assert calls == ["mlp", "norm"]
