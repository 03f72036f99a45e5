"""Where one decoder-layer call's time goes: each of its ops timed alone, and the whole call through
transformers' modules and through the lean path (models/decode_path.py). The fixed cost of a call is the
call's time minus the sum of its ops (Python dispatch, module wrappers, hooks, per-layer metadata).

Used by evals/decode_profile.py (`--ops`). Times are this process's CPU time per call (medians of
`rounds` rounds of `reps` calls): with one thread per rank they count the work, not the waits for other
jobs sharing the cores; an all-reduce's busy wait for the other rank does count.
"""
from __future__ import annotations

import statistics
import time

import torch

from seesaw_ds.kv.attention import decode_attention, paged_attention
from seesaw_ds.kv.native import paged_decode_op
from seesaw_ds.models.decode_path import LeanDecoder


def _cpu_ms(fn, reps: int, rounds: int, barrier) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(rounds):
        barrier()
        start = time.process_time()
        for _ in range(reps):
            fn()
        samples.append((time.process_time() - start) / reps)
    return 1e3 * statistics.median(samples)


@torch.inference_mode()
def layer_breakdown(runner, pool, meta, ids, positions, barrier=lambda: None, reps: int = 20,
                    rounds: int = 5, all_reduce=None) -> dict:
    """{op: CPU ms} for layer 0 at this batch, plus `hf_layer`, `lean_layer`, `sum_ops` and the two
    fixed costs. `all_reduce(x)` (TP) is timed on a [1, B, H] tensor as the row-parallel linears call it."""
    lean = runner.lean or LeanDecoder(runner.layers)          # built here when the switch turned it off
    if not lean.supported:
        raise ValueError("the lean decode path does not support this model")
    h = runner.embed(ids)
    cos, sin = runner.rotary_emb(h, positions[None, :])
    lean.run(h, (cos, sin), range(1), meta, pool)             # builds the lean layers
    ll = lean._lean[0]
    op = paged_decode_op()
    b, d = h.shape[1], ll.head_dim
    x = ll.norm1(h)
    q, k, v = (f(x).view(1, b, -1, d) for f in (ll.q, ll.k, ll.v))
    k_cache, v_cache = pool.layer(0)
    attn = decode_attention(q[0], k_cache, v_cache, meta, ll.scaling, op).reshape(1, b, -1)
    gate, up = ll.gate(x), ll.up(x)
    act = ll.act_mul(gate, up)
    if ll.packed:        # the calls the layer makes: q/k/v as one matmul, gate/up as one
        qkv = {"q/k/v (one packed matmul)": lambda: ll.qkv(x)}
        gate_up = {"gate/up (one packed matmul)": lambda: ll.gate_up(x)}
    else:
        qkv = {"q_proj": lambda: ll.q(x), "k_proj": lambda: ll.k(x), "v_proj": lambda: ll.v(x)}
        gate_up = {"gate_proj": lambda: ll.gate(x), "up_proj": lambda: ll.up(x)}
    if ll.rope_kv_write is not None:     # one fused op over the q/k/v matmul's output
        qkv_out = ll.packed["qkv"](x)
        rope_write = {"rope + kv write (fused)": lambda: ll.rope_kv_write(
            qkv_out, cos, sin, k_cache, v_cache, meta.slot_mapping, ll.heads, k_cache.shape[2])}
    else:
        rope_write = {"rope": lambda: ll.rope(q, k, cos, sin, unsqueeze_dim=2),
                      "kv write": lambda: pool.write(0, k.transpose(1, 2), v.transpose(1, 2), meta.slot_mapping)}
    ops = {
        "norm (x2)": lambda: (ll.norm1(h), ll.norm2(h)), **qkv, **rope_write,
        "attention": lambda: decode_attention(q[0], k_cache, v_cache, meta, ll.scaling, op),
        "o_proj": lambda: ll.o(attn), **gate_up,
        "act * up": lambda: ll.act_mul(gate, up), "down_proj": lambda: ll.down(act),
        "residual adds (x2)": lambda: (h + h, h + h),
    }
    out = {name: _cpu_ms(fn, reps, rounds, barrier) for name, fn in ops.items()}
    if all_reduce is not None:
        buf = torch.zeros_like(h)
        out["all-reduce (of o/down)"] = _cpu_ms(lambda: all_reduce(buf), reps, rounds, barrier)
    out["sum_ops"] = sum(v for name, v in out.items() if not name.startswith("all-reduce"))
    layer = runner.layers[0]

    def module_call():
        with paged_attention(meta, pool):
            layer(h, attention_mask=None, position_ids=positions[None, :], position_embeddings=(cos, sin))
    out["hf_layer"] = _cpu_ms(module_call, reps, rounds, barrier)
    out["lean_layer"] = _cpu_ms(lambda: ll(h, cos, sin, meta, pool, op), reps, rounds, barrier)
    out["hf_fixed"] = out["hf_layer"] - out["sum_ops"]
    out["lean_fixed"] = out["lean_layer"] - out["sum_ops"]
    return out


@torch.inference_mode()
def fixed_cost_per_call(hf_config, reps: int = 300, rounds: int = 7) -> dict:
    """CPU ms of one decoder-layer call whose arithmetic is next to nothing (a one-layer model of the
    same architecture, hidden 64, one sequence of one token): the fixed cost of a call, through
    transformers' modules and through the lean path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from seesaw_ds.kv.attention import AttentionMetadata
    from seesaw_ds.kv.pool import KVPool, KVPoolSpec
    from seesaw_ds.models.runner import ModelRunner
    tiny = AutoConfig.for_model(hf_config.model_type, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=64)
    model = AutoModelForCausalLM.from_config(tiny).to(torch.bfloat16).eval()
    runner = ModelRunner(model)
    pool = KVPool(KVPoolSpec(range(1), range(1), 2, 16, 32, torch.bfloat16))
    meta = AttentionMetadata(False, torch.tensor([0]), [], torch.tensor([[0]]), torch.tensor([1]))
    ids, positions = torch.tensor([3]), torch.tensor([0])
    h = runner.embed(ids)
    cos, sin = runner.rotary_emb(h, positions[None, :])
    lean = LeanDecoder(runner.layers)
    lean.run(h, (cos, sin), range(1), meta, pool)
    layer, ll, op = runner.layers[0], lean._lean[0], paged_decode_op()

    def module_call():
        with paged_attention(meta, pool):
            layer(h, attention_mask=None, position_ids=positions[None, :], position_embeddings=(cos, sin))
    return {"hf_call": _cpu_ms(module_call, reps, rounds, lambda: None),
            "lean_call": _cpu_ms(lambda: ll(h, cos, sin, meta, pool, op), reps, rounds, lambda: None)}
