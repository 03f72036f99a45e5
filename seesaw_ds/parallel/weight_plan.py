"""Pure plans that cut a Hugging Face Llama-family state dict into per-rank shards (and back).

Every rank computes the same plan from `(ModelConfig, Layout)`; nothing here touches a tensor.

Pipeline split (`stage_layer_ranges`): contiguous decoder-layer ranges, the first `L % pp` stages take one
extra layer (L=7, pp=3 -> 3/2/2). This equals DeepSpeed's `partition_uniform` and what `PipelineModule`'s
`partition_method="type:<DecoderLayer>"` yields when embedding / head specs carry no weight. Stage 0 holds
the embedding, the last stage holds the final norm and `lm_head.weight` (read from the embedding when the
embeddings are tied).

Tensor-parallel split, as DeepSpeed AutoTP (0.19.8) cuts a Llama decoder layer:

    tensor                      | cut dim        | split rule
    ----------------------------+----------------+--------------------------------------------
    q/k/v_proj weight (+bias)   | 0 (out)        | by KV-head groups (uneven: 3 kv over 2 -> 2/1)
    o_proj weight               | 1 (in)         | by KV-head groups; o_proj bias replicated
    gate/up_proj weight         | 0 (out)        | grain split of intermediate (grain 64)
    down_proj weight            | 1 (in)         | grain split of intermediate (grain 64)
    lm_head weight              | 1 (hidden, in) | grain split of hidden; vocab rows whole
    embed_tokens, norms         | -              | replicated
"""
from __future__ import annotations

import dataclasses

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.layout import Layout

# DeepSpeed's inference `tensor_parallel.tp_grain_size` default: MLP and lm_head cuts are multiples of it.
AUTOTP_GRAIN_SIZE = 64

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


# ---- shapes of the full checkpoint ---------------------------------------------------------------------
def has_o_proj_bias(cfg: ModelConfig) -> bool:
    # Llama's `attention_bias` puts a bias on o_proj too; Qwen2 biases only q/k/v.
    return cfg.qkv_bias and cfg.model_type == "llama"


def layer_weight_shapes(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    p = f"model.layers.{layer}."
    shapes = {p + "self_attn.q_proj.weight": (q_out, h), p + "self_attn.k_proj.weight": (kv_out, h),
              p + "self_attn.v_proj.weight": (kv_out, h), p + "self_attn.o_proj.weight": (h, q_out)}
    if cfg.qkv_bias:
        shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                       p + "self_attn.v_proj.bias": (kv_out,)})
    if has_o_proj_bias(cfg):
        shapes[p + "self_attn.o_proj.bias"] = (h,)
    shapes.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return shapes


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the full HF state dict (`lm_head.weight` absent when the embeddings are tied)."""
    shapes = {EMBED: (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_layers):
        shapes.update(layer_weight_shapes(cfg, layer))
    shapes[FINAL_NORM] = (cfg.hidden_size,)
    if not cfg.tie_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


# ---- split rules ---------------------------------------------------------------------------------------
def stage_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """Contiguous decoder layers per pipeline stage; the first `num_layers % pp` stages get one more."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"pp={pp} must be in [1, num_layers={num_layers}]")
    base, extra = divmod(num_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def head_split_sizes(total: int, tp: int, num_kv_heads: int) -> list[int]:
    """AutoTP's cut of an attention dim of `total` elements: whole KV-head groups, the first ranks one more."""
    groups = [num_kv_heads // tp + (1 if r < num_kv_heads % tp else 0) for r in range(tp)]
    return [total * g // num_kv_heads for g in groups]


def grain_split_sizes(total: int, tp: int, grain: int = AUTOTP_GRAIN_SIZE) -> list[int]:
    """AutoTP's cut of an MLP / lm_head dim: multiples of `grain`, the first ranks one more grain, the tail
    (`total % grain`) to the last rank; below one grain an element-wise near-even split."""
    if total < grain:
        return [total // tp + (1 if r < total % tp else 0) for r in range(tp)]
    grains, tail = divmod(total, grain)
    sizes = [(grains // tp + (1 if r < grains % tp else 0)) * grain for r in range(tp)]
    sizes[-1] += tail
    return sizes


def _ranges_from_sizes(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def tp_head_ranges(cfg: ModelConfig, tp: int) -> list[tuple[range, range]]:
    """Per TP rank: (query-head range, KV-head range), as AutoTP assigns them (9q/3kv over 2 -> 6q/2kv, 3q/1kv)."""
    if tp < 1 or tp > cfg.num_kv_heads:
        raise ValueError(f"tp={tp} must be in [1, num_kv_heads={cfg.num_kv_heads}]")
    kv = _ranges_from_sizes(head_split_sizes(cfg.num_kv_heads, tp, cfg.num_kv_heads))
    return [(range(r.start * cfg.q_per_kv, r.stop * cfg.q_per_kv), r) for r in kv]


# ---- plan entries --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One tensor of a rank's shard: `shard[name] = full[source_name][source_ranges]`."""
    name: str                                   # key in the rank's shard dict (an HF name)
    source_name: str                            # key in the full HF state dict
    source_ranges: tuple[tuple[int, int], ...]  # [start, stop) per dim of the source tensor
    # NOTE: across all ranks of a plan the primary entries cover each source element exactly once;
    # replicas (norms, embedding on other TP ranks, the tied head) are primary=False.
    primary: bool = True

    def __post_init__(self):
        for dim, (start, stop) in enumerate(self.source_ranges):
            if not 0 <= start <= stop:
                raise ValueError(f"ShardEntry.source_ranges[{dim}]=({start}, {stop}) of {self.name} is not a range")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(stop - start for start, stop in self.source_ranges)

    @property
    def source_slices(self) -> tuple[slice, ...]:
        return tuple(slice(start, stop) for start, stop in self.source_ranges)


def _entry(name, shape, *, cut_dim=None, cut=None, source_name=None, primary=True) -> ShardEntry:
    ranges = [(0, n) for n in shape]
    if cut_dim is not None:
        ranges[cut_dim] = (cut.start, cut.stop)
    return ShardEntry(name, source_name or name, tuple(ranges), primary)


def shard_entries(cfg: ModelConfig, layout: Layout, pp_stage: int, tp_rank: int,
                  grain: int = AUTOTP_GRAIN_SIZE) -> tuple[ShardEntry, ...]:
    """The tensors that rank (pp_stage, tp_rank) of one replica holds under `layout`."""
    tp, pp = layout.tp, layout.pp
    if not (0 <= pp_stage < pp and 0 <= tp_rank < tp):
        raise ValueError(f"(pp_stage={pp_stage}, tp_rank={tp_rank}) outside layout {layout.describe()}")
    d, h, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    q_heads, kv_heads = tp_head_ranges(cfg, tp)[tp_rank]
    q_cut = range(q_heads.start * d, q_heads.stop * d)
    kv_cut = range(kv_heads.start * d, kv_heads.stop * d)
    inter_cut = _ranges_from_sizes(grain_split_sizes(inter, tp, grain))[tp_rank]
    replica_primary = tp_rank == 0  # replicated tensors: TP rank 0 owns the elements
    cut_of = {  # suffix -> (cut dim, cut range); absent: replicated
        "self_attn.q_proj.weight": (0, q_cut), "self_attn.q_proj.bias": (0, q_cut),
        "self_attn.k_proj.weight": (0, kv_cut), "self_attn.k_proj.bias": (0, kv_cut),
        "self_attn.v_proj.weight": (0, kv_cut), "self_attn.v_proj.bias": (0, kv_cut),
        "self_attn.o_proj.weight": (1, q_cut),
        "mlp.gate_proj.weight": (0, inter_cut), "mlp.up_proj.weight": (0, inter_cut),
        "mlp.down_proj.weight": (1, inter_cut),
    }
    entries = []
    if pp_stage == 0:
        entries.append(_entry(EMBED, (cfg.vocab_size, h), primary=replica_primary))
    for layer in stage_layer_ranges(cfg.num_layers, pp)[pp_stage]:
        for name, shape in layer_weight_shapes(cfg, layer).items():
            suffix = name.split(".", 3)[3]
            if suffix in cut_of:
                dim, cut = cut_of[suffix]
                entries.append(_entry(name, shape, cut_dim=dim, cut=cut))
            else:
                entries.append(_entry(name, shape, primary=replica_primary))
    if pp_stage == pp - 1:
        entries.append(_entry(FINAL_NORM, (h,), primary=replica_primary))
        hidden_cut = _ranges_from_sizes(grain_split_sizes(h, tp, grain))[tp_rank]
        head_source = EMBED if cfg.tie_embeddings else LM_HEAD
        entries.append(_entry(LM_HEAD, (cfg.vocab_size, h), cut_dim=1, cut=hidden_cut,
                              source_name=head_source, primary=not cfg.tie_embeddings))
    return tuple(entries)


def vocab_rows(cfg: ModelConfig, tp: int, grain: int = AUTOTP_GRAIN_SIZE) -> list[range]:
    """The vocabulary-parallel head's rows per TP rank (models/vocab_head.py), cut as AutoTP cuts a dim."""
    return _ranges_from_sizes(grain_split_sizes(cfg.vocab_size, tp, grain))


def vocab_head_entry(cfg: ModelConfig, tp: int, tp_rank: int, grain: int = AUTOTP_GRAIN_SIZE) -> ShardEntry:
    """The `weight` of TP rank `tp_rank`'s vocabulary-parallel head: its rows of the LM head (the embedding
    when tied), whole hidden width. A replica of elements AutoTP's head shards already cover."""
    rows = vocab_rows(cfg, tp, grain)[tp_rank]
    return _entry("weight", (cfg.vocab_size, cfg.hidden_size), cut_dim=0, cut=rows,
                  source_name=EMBED if cfg.tie_embeddings else LM_HEAD, primary=False)


def whole_model_entries(cfg: ModelConfig) -> tuple[ShardEntry, ...]:
    """Every parameter of the unsharded model as whole tensors (`lm_head.weight` reads the embedding when
    the embeddings are tied): the entries that bind a one-process model to the master copy."""
    return shard_entries(cfg, Layout(), 0, 0)


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """Shards of one replica, indexed by local rank (`pp_stage * tp + tp_rank`, see layout.py)."""
    cfg: ModelConfig
    layout: Layout
    grain: int
    shards: tuple[tuple[ShardEntry, ...], ...]

    def __post_init__(self):
        if len(self.shards) != self.layout.ranks_per_replica:
            raise ValueError(f"WeightPlan.shards has {len(self.shards)} ranks; layout {self.layout.describe()} "
                             f"needs {self.layout.ranks_per_replica}")

    def for_global_rank(self, global_rank: int) -> tuple[ShardEntry, ...]:
        return self.shards[self.layout.coords(global_rank).local_rank]


def weight_plan(cfg: ModelConfig, layout: Layout, grain: int = AUTOTP_GRAIN_SIZE) -> WeightPlan:
    """Plan for every rank of a replica. `Layout(pp=N)`: pipeline plan; `Layout(tp=N)`: AutoTP plan."""
    if layout.pp > cfg.num_layers:
        raise ValueError(f"pp={layout.pp} exceeds the model's {cfg.num_layers} layers")
    shards = tuple(shard_entries(cfg, layout, s, t, grain) for s in range(layout.pp) for t in range(layout.tp))
    return WeightPlan(cfg, layout, grain, shards)
