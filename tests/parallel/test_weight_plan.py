import random

import pytest
import torch

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.copy import bind_views
from seesaw_ds.parallel.layout import Layout
from seesaw_ds.parallel.weight_plan import (AUTOTP_GRAIN_SIZE, grain_split_sizes, head_split_sizes,
                                            hf_weight_shapes, stage_layer_ranges, tp_head_ranges, weight_plan,
                                            whole_model_entries)
from tests.parallel.reference_copy import assemble_full, materialize_shard

BASE = dict(model_type="llama", num_layers=7, hidden_size=144, intermediate_size=200, num_heads=9, num_kv_heads=3,
            head_dim=16, vocab_size=50, max_position=128, rope_theta=1e4, tie_embeddings=False, qkv_bias=False,
            sliding_window=None, rms_norm_eps=1e-6)


def _random_cfgs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kv = rng.choice([1, 2, 3, 4, 5])
        out.append(dict(model_type=rng.choice(["llama", "qwen2", "mistral"]), num_layers=rng.randint(1, 9),
                        num_kv_heads=kv, num_heads=kv * rng.choice([1, 2, 3]), head_dim=rng.choice([4, 8]),
                        hidden_size=rng.choice([24, 64, 100, 144]), intermediate_size=rng.choice([40, 64, 130, 200]),
                        tie_embeddings=rng.random() < 0.5, qkv_bias=rng.random() < 0.5))
    return out


CFGS = [dict(), dict(tie_embeddings=True, qkv_bias=True),
        dict(model_type="qwen2", qkv_bias=True, tie_embeddings=True, num_layers=5, num_heads=8, num_kv_heads=4,
             hidden_size=64, intermediate_size=40),
        dict(num_heads=12, num_kv_heads=4, num_layers=3, hidden_size=200, intermediate_size=300, head_dim=8),
        ] + _random_cfgs(6)


def _layouts(cfg):
    out = [Layout(pp=p) for p in range(1, min(cfg.num_layers, 4) + 1)]
    out += [Layout(tp=t) for t in range(2, min(cfg.num_kv_heads, 4) + 1)]
    if cfg.num_layers >= 2 and cfg.num_kv_heads >= 2:
        out.append(Layout(tp=2, pp=2))
    return out


def _cases():
    for i, overrides in enumerate(CFGS):
        cfg = ModelConfig(**{**BASE, **overrides})
        for layout in _layouts(cfg):
            yield pytest.param(cfg, layout, id=f"cfg{i}-tp{layout.tp}pp{layout.pp}")


def _full_state(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in hf_weight_shapes(cfg).items()}


def _ds_meta(cfg):
    from deepspeed.module_inject.tp_shard import AutoTPMeta
    return AutoTPMeta(num_kv_heads=cfg.num_kv_heads, num_attention_heads=cfg.num_heads,
                      n_embd=cfg.hidden_size, tp_grain_size=AUTOTP_GRAIN_SIZE)


def _reference_shard(cfg, layout, pp_stage, tp_rank, full):
    """What a rank should hold, built from DeepSpeed's own split functions and partition_uniform."""
    from deepspeed.module_inject.tp_shard import get_shard_size_list
    from deepspeed.runtime.utils import partition_uniform
    meta, tp = _ds_meta(cfg), layout.tp
    bounds = partition_uniform(cfg.num_layers, layout.pp)
    layers = range(bounds[pp_stage], bounds[pp_stage + 1])

    def split(t, dim, ds_name):
        return t.split(get_shard_size_list(t.shape[dim], tp, meta, ds_name), dim=dim)[tp_rank]

    ref = {}
    if pp_stage == 0:
        ref["model.embed_tokens.weight"] = full["model.embed_tokens.weight"]
    for name, t in full.items():
        if not name.startswith("model.layers.") or int(name.split(".")[2]) not in layers:
            continue
        module = ".".join(name.split(".")[3:5])  # e.g. "self_attn.q_proj", AutoTP's layer name
        if module.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            ref[name] = split(t, 0, module)
        elif module.endswith(("o_proj", "down_proj")) and name.endswith(".weight"):
            ref[name] = split(t, 1, module)
        else:
            ref[name] = t
    if pp_stage == layout.pp - 1:
        ref["model.norm.weight"] = full["model.norm.weight"]
        head = full["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
        ref["lm_head.weight"] = split(head, 1, "lm_head")
    return ref


@pytest.mark.parametrize("cfg, layout", list(_cases()))
def test_plan_tiles_and_round_trips(cfg, layout):
    plan = weight_plan(cfg, layout)
    shapes = hf_weight_shapes(cfg)
    counts = {name: torch.zeros(shape, dtype=torch.int32) for name, shape in shapes.items()}
    for entries in plan.shards:
        assert len({e.name for e in entries}) == len(entries), "a rank holds a name twice"
        for e in entries:
            assert all(stop <= n for (_, stop), n in zip(e.source_ranges, shapes[e.source_name]))
            if e.primary:
                counts[e.source_name][e.source_slices] += 1
    for name, c in counts.items():
        assert torch.all(c == 1), f"{name}: elements covered {c.min().item()}..{c.max().item()} times"

    full = _full_state(cfg)
    shards = []
    for local, entries in enumerate(plan.shards):
        pp_stage, tp_rank = divmod(local, layout.tp)
        shard = materialize_shard(entries, full)
        ref = _reference_shard(cfg, layout, pp_stage, tp_rank, full)
        assert set(shard) == set(ref)
        for name, t in shard.items():
            assert t.is_contiguous() and torch.equal(t, ref[name]), name
            assert t.untyped_storage().data_ptr() != full[next(e.source_name for e in entries if e.name == name)] \
                .untyped_storage().data_ptr(), "shards must not alias the full tensors"
        # the same shard written into NaN-filled destinations: every element written
        nan_out = {e.name: torch.full(e.shape, float("nan")) for e in entries}
        materialize_shard(entries, full, out=nan_out)
        for name, t in nan_out.items():
            assert torch.equal(t, ref[name]), name
        shards.append(shard)

    back = assemble_full(plan, shards, out={n: torch.full(s, float("nan")) for n, s in shapes.items()})
    assert set(back) == set(full)
    for name in full:
        assert torch.equal(back[name], full[name]), name


def test_whole_model_entries_read_the_embedding_for_a_tied_head():
    cfg = ModelConfig(**{**BASE, "tie_embeddings": True})
    entries = {e.name: e for e in whole_model_entries(cfg)}
    head = entries["lm_head.weight"]
    assert head.source_name == "model.embed_tokens.weight" and not head.primary
    assert head.shape == (cfg.vocab_size, cfg.hidden_size)
    assert set(entries) == set(hf_weight_shapes(cfg)) | {"lm_head.weight"}
    untied = ModelConfig(**BASE)
    assert {e.name: e.source_name for e in whole_model_entries(untied)}["lm_head.weight"] == "lm_head.weight"


def _module_with(shapes: dict) -> torch.nn.Module:
    """A module tree with one NaN-filled parameter per dotted name (what a rank's model holds)."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.full(shape, float("nan")), requires_grad=False))
    return root


@pytest.mark.parametrize("cfg, layout", list(_cases())[::3])
def test_bind_views_points_every_rank_at_its_slices(cfg, layout):
    full = _full_state(cfg)
    for local, entries in enumerate(weight_plan(cfg, layout).shards):
        pp_stage, tp_rank = divmod(local, layout.tp)
        module = _module_with({e.name: e.shape for e in entries})
        moved = bind_views(module, entries, full)
        assert moved == sum(4 * torch.Size(e.shape).numel() for e in entries)
        ref = _reference_shard(cfg, layout, pp_stage, tp_rank, full)
        params = dict(module.named_parameters())
        for e in entries:
            p = params[e.name]
            assert torch.equal(p, ref[e.name]), e.name
            storage = full[e.source_name].untyped_storage()
            assert p.untyped_storage().data_ptr() == storage.data_ptr(), f"{e.name} is not a view"
        assert bind_views(module, entries, full, check_equal=True) == 0      # already bound
        new = {n: t + 1 for n, t in full.items()}                            # a replaced master copy
        assert bind_views(module, entries, new) == moved
        for t in new.values():                                               # writes show through
            t.mul_(-2)
        for e in entries:
            assert torch.equal(params[e.name], new[e.source_name][e.source_slices]), e.name


def test_bind_views_errors_name_the_tensor():
    cfg = ModelConfig(**{**BASE, "tie_embeddings": True, "num_layers": 1})
    entries = whole_model_entries(cfg)
    full = _full_state(cfg)
    module = _module_with({e.name: e.shape for e in entries if e.name != "lm_head.weight"})
    module.add_module("lm_head", torch.nn.Module())
    module.lm_head.weight = module.model.embed_tokens.weight                # one Parameter, two names
    released = bind_views(module, entries, full)
    assert released == sum(t.numel() * 4 for t in full.values())           # the tied head counted once
    assert module.lm_head.weight.data_ptr() == full["model.embed_tokens.weight"].data_ptr()
    with pytest.raises(ValueError, match="differs"):
        bind_views(module, entries, {n: t + 1 for n, t in full.items()}, check_equal=True)
    bad = dict(full, **{"model.norm.weight": torch.zeros(cfg.hidden_size - 1)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        bind_views(module, entries, bad)
    with pytest.raises(ValueError, match="float64"):
        bind_views(module, entries, {n: t.double() for n, t in full.items()})
    with pytest.raises(KeyError, match="does not have"):
        bind_views(torch.nn.Linear(2, 2), entries, full)


def test_smollm2_head_split():
    cfg = ModelConfig(**{**BASE, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "hidden_size": 576})
    assert tp_head_ranges(cfg, 2) == [(range(0, 6), range(0, 2)), (range(6, 9), range(2, 3))]
    assert tp_head_ranges(cfg, 3) == [(range(0, 3), range(0, 1)), (range(3, 6), range(1, 2)),
                                      (range(6, 9), range(2, 3))]
    assert [e.shape for e in weight_plan(cfg, Layout(tp=2)).shards[1] if e.name.endswith("0.self_attn.k_proj.weight")
            ] == [(64, 576)]


def test_stage_layer_ranges_match_deepspeed_partitioning():
    from deepspeed.runtime.utils import partition_balanced, partition_uniform
    assert stage_layer_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    for layers in range(1, 13):
        for pp in range(1, layers + 1):
            ranges = stage_layer_ranges(layers, pp)
            bounds = [r.start for r in ranges] + [layers]
            assert bounds == partition_uniform(layers, pp)
            # PipelineModule(partition_method="type:Decoder") over [embed, decoders..., norm, head]
            weights = [0] + [1] * layers + [0, 0]
            parts = partition_balanced(weights, pp)
            assert [sum(weights[parts[s]:parts[s + 1]]) for s in range(pp)] == [len(r) for r in ranges]
    with pytest.raises(ValueError, match="pp=5"):
        stage_layer_ranges(4, 5)


def test_split_sizes_equal_deepspeed_functions():
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list
    for kv in range(1, 9):
        for q_per_kv in (1, 3):
            for head_dim in (4, 64):
                meta = AutoTPMeta(num_kv_heads=kv, tp_grain_size=AUTOTP_GRAIN_SIZE)
                for tp in range(1, kv + 1):
                    for total, ds_name in ((kv * q_per_kv * head_dim, "self_attn.q_proj"),
                                           (kv * head_dim, "self_attn.k_proj"),
                                           (kv * q_per_kv * head_dim, "self_attn.o_proj")):
                        assert head_split_sizes(total, tp, kv) == get_shard_size_list(total, tp, meta, ds_name)
    for total in (1, 7, 40, 63, 64, 65, 130, 200, 576, 1536, 8192 + 17):
        for tp in range(1, 9):
            for ds_name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"):
                meta = AutoTPMeta(num_kv_heads=3, tp_grain_size=AUTOTP_GRAIN_SIZE)
                assert grain_split_sizes(total, tp) == get_shard_size_list(total, tp, meta, ds_name), (total, tp)


@pytest.mark.parametrize("model_type, extra, tied", [
    ("llama", {}, False), ("llama", {"attention_bias": True}, True), ("qwen2", {}, True), ("mistral", {}, False)])
def test_hf_weight_shapes_match_transformers(model_type, extra, tied):
    from transformers import AutoConfig, AutoModelForCausalLM
    hf = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=48, intermediate_size=70,
                              num_attention_heads=6, num_key_value_heads=2, head_dim=8, vocab_size=40,
                              tie_word_embeddings=tied, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    actual = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied params appear once
    assert actual == hf_weight_shapes(ModelConfig.from_hf(hf))
