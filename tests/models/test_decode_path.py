"""The lean decode path (models/decode_path.py) computes exactly what transformers' modules compute: the
same logits bit for bit and the same K/V written to the pool, on one rank (bf16 with the fused ops, fp32
without them; Llama, Qwen2 with q/k/v biases, Mistral) and on two AutoTP ranks (row-parallel all-reduce).
The reference is the module path of the same runner (`SEESAW_DS_LEAN_DECODE=0`), which the identity tests
compare with Hugging Face `generate`. Those bitwise checks run the linears as F.linear
(`SEESAW_DS_PACKED_LINEAR=0`); with bf16's packed linears (models/packed_linear.py, oneDNN's blocking may
differ by shape) the logits are checked to bf16 rounding and the greedy tokens exactly."""
from __future__ import annotations

import pytest
import torch

from seesaw_ds.kv.attention import AttentionMetadata
from seesaw_ds.kv.pool import KVPool, KVPoolSpec
from seesaw_ds.models.runner import ModelRunner
from tests.conftest import tiny_hf_model
from tests.distributed.harness import run_ranks

BLOCK = 4


def decode_inputs(cfg, kv_heads: int, dtype, batch: int = 5, seed: int = 0):
    """A random pool and the decode inputs of `batch` sequences with different context lengths."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ctx = torch.randint(3, 23, (batch,), generator=gen)
    blocks = [-(-int(n) // BLOCK) for n in ctx]
    spec = KVPoolSpec(range(cfg.num_hidden_layers), range(kv_heads), sum(blocks) + 2, BLOCK, head_dim, dtype)
    pool = KVPool(spec)
    pool.tensor.copy_(torch.randn(spec.shape, generator=gen))
    order = torch.randperm(spec.num_blocks, generator=gen).tolist()
    tables = torch.zeros(batch, max(blocks), dtype=torch.long)
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.tensor(order[at:at + n])
        at += n
    pos = ctx - 1
    slots = tables.gather(1, (pos // BLOCK)[:, None])[:, 0] * BLOCK + pos % BLOCK
    meta = AttentionMetadata(False, slots, [], tables, ctx)
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=gen)
    return pool, meta, ids, pos


def lean_and_module_paths(runner: ModelRunner, pool, meta, ids, pos):
    """(logits, pool) of one decode step through each path, from the same starting pool."""
    start = pool.tensor.clone()
    rows = torch.arange(len(ids))
    out = []
    lean = runner.lean
    for path in (lean, None):
        runner.lean = path
        pool.tensor.copy_(start)
        with torch.inference_mode():
            logits = runner.forward(ids, pos, meta, pool, rows)
        out.append((logits, pool.tensor.clone()))
    runner.lean = lean
    return out


@pytest.mark.parametrize("kind,dtype", [("llama", torch.bfloat16), ("qwen2", torch.bfloat16),
                                        ("mistral", torch.bfloat16), ("llama", torch.float32)])
def test_lean_decode_equals_module_path_bitwise(kind, dtype, monkeypatch):
    monkeypatch.setenv("SEESAW_DS_PACKED_LINEAR", "0")
    model = tiny_hf_model(kind).to(dtype)
    runner = ModelRunner(model)
    assert runner.lean is not None and runner.lean.supported
    pool, meta, ids, pos = decode_inputs(model.config, model.config.num_key_value_heads, dtype)
    (lean_logits, lean_pool), (ref_logits, ref_pool) = lean_and_module_paths(runner, pool, meta, ids, pos)
    assert torch.equal(lean_logits, ref_logits)
    assert torch.equal(lean_pool, ref_pool)


def close_in_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    """Logits of two bf16 paths whose linears may round differently: close, same greedy token."""
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_lean_decode_close_to_module_path(kind):
    model = tiny_hf_model(kind).to(torch.bfloat16)
    runner = ModelRunner(model)
    pool, meta, ids, pos = decode_inputs(model.config, model.config.num_key_value_heads, torch.bfloat16)
    (lean_logits, lean_pool), (ref_logits, ref_pool) = lean_and_module_paths(runner, pool, meta, ids, pos)
    assert runner.lean.packed_bytes > 0, "the packed linears did not run"
    close_in_bf16(lean_logits, ref_logits)
    torch.testing.assert_close(lean_pool, ref_pool, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("packed", ["0", "1"])
def test_lean_decode_reads_rebound_weights(packed, monkeypatch):
    """The path holds modules, not tensors: a weight re-pointed after the first step is used at once."""
    monkeypatch.setenv("SEESAW_DS_PACKED_LINEAR", packed)
    model = tiny_hf_model("llama").to(torch.bfloat16)
    runner = ModelRunner(model)
    pool, meta, ids, pos = decode_inputs(model.config, model.config.num_key_value_heads, torch.bfloat16)
    first, _ = lean_and_module_paths(runner, pool, meta, ids, pos)
    proj = model.model.layers[1].mlp.down_proj
    proj.weight = torch.nn.Parameter(proj.weight * 2, requires_grad=False)
    (lean_logits, _), (ref_logits, _) = lean_and_module_paths(runner, pool, meta, ids, pos)
    if packed == "0":
        assert torch.equal(lean_logits, ref_logits)
    else:
        close_in_bf16(lean_logits, ref_logits)
    assert not torch.equal(lean_logits, first[0])


def test_lean_decode_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("SEESAW_DS_LEAN_DECODE", "0")
    assert ModelRunner(tiny_hf_model("llama")).lean is None


def _autotp_rank(rank, state, kind, packed="0"):
    import os

    import deepspeed
    os.environ["SEESAW_DS_PACKED_LINEAR"] = packed
    from seesaw_ds.distributed.builder import init_distributed
    init_distributed()
    model = tiny_hf_model(kind, num_attention_heads=6, num_key_value_heads=3).to(torch.bfloat16)
    model.load_state_dict(state)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.bfloat16,
                                      replace_with_kernel_inject=False)
    runner = ModelRunner(engine.module)
    kv_heads = runner.layers[0].self_attn.k_proj.weight.shape[0] // (model.config.hidden_size //
                                                                     model.config.num_attention_heads)
    pool, meta, ids, pos = decode_inputs(model.config, kv_heads, torch.bfloat16, seed=rank)
    (lean_logits, lean_pool), (ref_logits, ref_pool) = lean_and_module_paths(runner, pool, meta, ids, pos)
    if packed == "1":
        assert runner.lean.packed_bytes > 0, "the packed linears did not run"
        close_in_bf16(lean_logits, ref_logits)
        return {"kv_heads": kv_heads, "head": type(runner.lm_head).__name__, "head_packed": runner.lean._head is not None}
    return {"logits_equal": bool(torch.equal(lean_logits, ref_logits)),
            "pool_equal": bool(torch.equal(lean_pool, ref_pool)), "kv_heads": kv_heads}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lean_decode_equals_module_path_under_autotp(kind, tmp_path):
    """Uneven heads (3 KV heads over 2 ranks) and the row-parallel all-reduce, as AutoTP runs them."""
    state = tiny_hf_model(kind, num_attention_heads=6, num_key_value_heads=3).to(torch.bfloat16).state_dict()
    result = run_ranks(2, _autotp_rank, state, kind, out_dir=str(tmp_path))
    assert result == {"logits_equal": True, "pool_equal": True, "kv_heads": 2}


def test_packed_lean_decode_close_under_autotp(tmp_path):
    """The packed row-parallel linears all-reduce, then add their bias, as AutoTP's forward does; so does the
    LM head, split by AutoTP over the hidden columns."""
    state = tiny_hf_model("qwen2", num_attention_heads=6, num_key_value_heads=3).to(torch.bfloat16).state_dict()
    assert run_ranks(2, _autotp_rank, state, "qwen2", "1", out_dir=str(tmp_path)) == \
        {"kv_heads": 2, "head": "LmHeadLinearAllreduce", "head_packed": True}
