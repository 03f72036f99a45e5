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


def test_silu_mul_reads_the_halves_of_one_matmul_output_in_place(ops):
    both = (torch.randn(1, 47, 2 * 1536) * 4).bfloat16()            # gate/up's one packed matmul
    gate, up = both.split(1536, dim=-1)                              # row stride 3072, not contiguous
    got = ops[1](gate, up)
    assert got.is_contiguous() and torch.equal(got, F.silu(gate) * up)
    strided = (torch.randn(6, 4, 1536) * 4).bfloat16()[:, ::2]       # no one row stride: copied first
    assert torch.equal(ops[1](strided, strided), F.silu(strided) * strided)


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


def test_a_long_prefill_mlp_runs_in_row_chunks_with_the_same_bits(ops, monkeypatch):
    import seesaw_ds.models.fused as fused
    monkeypatch.setattr(fused, "MLP_ROWS", 8)
    model = tiny_hf_model().bfloat16()
    use_fused_layer_ops(model)
    mlp = model.model.layers[0].mlp
    calls = []
    monkeypatch.setattr(mlp.down_proj, "forward", lambda x, f=mlp.down_proj.forward: calls.append(x.shape) or f(x))
    meta = AttentionMetadata(True, torch.zeros(4, dtype=torch.long), [0, 4], None, None)
    for tokens, passes in ((16, [(1, 16, 192)]), (37, [(8, 192)] * 4 + [(5, 192)])):
        x = torch.randn(1, tokens, 96).bfloat16()
        calls.clear()
        with paged_attention(meta, None):
            out = mlp(x)
        reference = mlp.down_proj(ops[1](mlp.gate_proj(x), mlp.up_proj(x)))   # the whole step at once
        assert out.shape == x.shape and torch.equal(out, reference) and calls[:-1] == passes, calls


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 2, 128), (2, 1, 24)])   # 24: the scalar path
def test_rope_kv_write_matches_transformers(ops, heads, kv_heads, d):
    """A decode step's rope over q and k, and the K/V cache writes, bit for bit as transformers' rope and the
    pool's index_copy; the cache's other rows untouched."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    g = torch.Generator().manual_seed(heads * d)
    tokens = 7
    qkv = (torch.randn(1, tokens, (heads + 2 * kv_heads) * d, generator=g) * 4).bfloat16()
    angles = torch.rand(1, tokens, d // 2, generator=g) * 100
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).bfloat16() for f in (torch.cos, torch.sin))   # [1, T, D]
    k_cache = torch.zeros(5, 4, kv_heads, d, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(20, generator=g)[:tokens]
    q = ops[2](qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads)

    want_q, want_k, want_v = (t.view(1, tokens, -1, d) for t in qkv.split([heads * d, kv_heads * d, kv_heads * d], -1))
    want_q, want_k = apply_rotary_pos_emb(want_q, want_k, cos, sin, unsqueeze_dim=2)
    assert q.shape == (tokens, heads, d) and torch.equal(q, want_q[0])
    assert torch.equal(k_cache.view(-1, kv_heads, d)[slots], want_k[0])
    assert torch.equal(v_cache.view(-1, kv_heads, d)[slots], want_v[0])
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(-1, kv_heads, d)[untouched].any() and not v_cache.view(-1, kv_heads, d)[untouched].any()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops[2](qkv, cos, sin, k_cache, v_cache, slots + 20, heads, kv_heads)


@pytest.mark.parametrize("heads,d,batch", [(9, 64, 1), (3, 64, 2), (4, 128, 1), (2, 24, 1)])   # 24: the scalar path
def test_rope_matches_transformers_on_a_prefill(ops, heads, d, batch):
    """A prefill's rope: q/k as transformers' attention holds them ([B, T, H, D] matmul output viewed as
    [B, H, T, D]), cos/sin [B, T, D]; the same bits as apply_rotary_pos_emb, in the input's layout."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    g = torch.Generator().manual_seed(heads * d + batch)
    tokens = 37
    q = (torch.randn(batch, tokens, heads * d, generator=g) * 4).bfloat16().view(batch, tokens, heads, d).transpose(1, 2)
    angles = torch.rand(batch, tokens, d // 2, generator=g) * 100
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).bfloat16() for f in (torch.cos, torch.sin))   # [B, T, D]
    want, _ = apply_rotary_pos_emb(q, q, cos, sin)
    got = ops[3](q, cos, sin)
    assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(ops[3](q, cos[:1], sin[:1]), apply_rotary_pos_emb(q, q, cos[:1], sin[:1])[0])   # broadcast


def test_prefill_rope_is_fused_only_inside_an_engine_forward(ops, monkeypatch):
    import transformers.models.llama.modeling_llama as llama
    from seesaw_ds.models.fused import use_fused_rope
    model = tiny_hf_model().bfloat16()
    original = getattr(llama.apply_rotary_pos_emb, "seesaw_original", llama.apply_rotary_pos_emb)
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", original)
    assert use_fused_rope(model) and use_fused_rope(model)             # installed once
    fused = llama.apply_rotary_pos_emb
    assert fused.seesaw_original is original
    calls = []
    import seesaw_ds.models.fused as fused_module
    monkeypatch.setattr(fused_module, "layer_ops", lambda: (None, None, None, lambda *a: calls.append(1) or ops[3](*a)))
    q = torch.randn(1, 6, 4, 16).bfloat16().transpose(1, 2)           # [1, H=4, T=6, D=16]
    cos, sin = torch.randn(1, 6, 16).bfloat16(), torch.randn(1, 6, 16).bfloat16()
    want = original(q, q, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(fused(q, q, cos, sin), want)) and calls == []
    meta = AttentionMetadata(True, torch.zeros(6, dtype=torch.long), [0, 6], None, None)
    with paged_attention(meta, None):
        assert all(torch.equal(a, b) for a, b in zip(fused(q, q, cos, sin), want))
        assert calls == [1, 1]
        fused(q.float(), q.float(), cos.float(), sin.float())          # float32: transformers' own code
        fused(q.transpose(1, 2), q.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    assert calls == [1, 1]
