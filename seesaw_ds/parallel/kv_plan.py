"""Pure KV re-sharding plans: which (layer range x KV-head range) rectangles move between ranks.

Per sequence the host store holds K/V head-major:  kv: [L, 2 (k/v), kv_heads, tokens, head_dim].
A rank of a replica owns one rectangle of (layers x KV heads), all tokens:

    layout        | rank (pp_stage, tp_rank) owns
    --------------+------------------------------------------------------------
    prefill pp=N  | stage_layer_ranges(L, N)[pp_stage]  x  all KV heads
    decode  tp=N  | all layers                           x  tp_head_ranges(cfg, N)[tp_rank][1]
    general       | stage layers                         x  the TP rank's KV heads

A plan intersects every source rectangle with every destination rectangle; each non-empty intersection is
one move. Together the moves tile the (L x kv_heads) grid exactly once.
"""
from __future__ import annotations

import dataclasses

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.layout import Layout
from seesaw_ds.parallel.weight_plan import stage_layer_ranges, tp_head_ranges


def _check_range(owner: str, field: str, r: range) -> None:
    if not isinstance(r, range) or r.step != 1 or len(r) == 0:
        raise ValueError(f"{owner}.{field} must be a non-empty range with step 1, got {r!r}")


@dataclasses.dataclass(frozen=True)
class KVRect:
    layers: range  # global layer indices
    heads: range   # global KV-head indices

    def __post_init__(self):
        _check_range("KVRect", "layers", self.layers)
        _check_range("KVRect", "heads", self.heads)

    def intersect(self, other: "KVRect") -> "KVRect | None":
        layers = range(max(self.layers.start, other.layers.start), min(self.layers.stop, other.layers.stop))
        heads = range(max(self.heads.start, other.heads.start), min(self.heads.stop, other.heads.stop))
        return KVRect(layers, heads) if len(layers) and len(heads) else None

    def relative_to(self, outer: "KVRect") -> tuple[slice, slice]:
        """(layer slice, head slice) of this rectangle inside a tensor that holds `outer`."""
        if not (outer.layers.start <= self.layers.start and self.layers.stop <= outer.layers.stop
                and outer.heads.start <= self.heads.start and self.heads.stop <= outer.heads.stop):
            raise ValueError(f"{self} is not inside {outer}")
        return (slice(self.layers.start - outer.layers.start, self.layers.stop - outer.layers.start),
                slice(self.heads.start - outer.heads.start, self.heads.stop - outer.heads.start))

    @property
    def slices(self) -> tuple[slice, slice]:
        """(layer slice, head slice) inside a full [L, 2, kv_heads, ...] tensor."""
        return slice(self.layers.start, self.layers.stop), slice(self.heads.start, self.heads.stop)


def kv_ownership(cfg: ModelConfig, layout: Layout) -> list[KVRect]:
    """The rectangle each local rank of a replica owns (index = pp_stage * tp + tp_rank)."""
    stages = stage_layer_ranges(cfg.num_layers, layout.pp)
    heads = [kv for _, kv in tp_head_ranges(cfg, layout.tp)]
    return [KVRect(stages[s], heads[t]) for s in range(layout.pp) for t in range(layout.tp)]


@dataclasses.dataclass(frozen=True)
class KVMove:
    src_rank: int   # local rank in the source layout
    dst_rank: int   # local rank in the destination layout
    rect: KVRect    # global (layers, heads) moved
    src_owned: KVRect  # what src_rank holds: locates `rect` inside its local tensor
    dst_owned: KVRect

    def __post_init__(self):
        self.rect.relative_to(self.src_owned)  # raises when the move leaves its owners
        self.rect.relative_to(self.dst_owned)

    @property
    def src_slices(self) -> tuple[slice, slice]:
        return self.rect.relative_to(self.src_owned)

    @property
    def dst_slices(self) -> tuple[slice, slice]:
        return self.rect.relative_to(self.dst_owned)


def kv_reshard_plan(cfg: ModelConfig, src: Layout, dst: Layout) -> tuple[KVMove, ...]:
    """Moves that turn a replica's KV from the `src` layout into the `dst` layout (e.g. PP prefill -> TP decode).

    Deterministic: ordered by destination rank, then source rank.
    """
    if src.ranks_per_replica != dst.ranks_per_replica:
        raise ValueError(f"source tp*pp={src.ranks_per_replica} differs from destination "
                         f"tp*pp={dst.ranks_per_replica}: KV moves stay inside one replica")
    src_rects, dst_rects = kv_ownership(cfg, src), kv_ownership(cfg, dst)
    moves = []
    for d, dst_rect in enumerate(dst_rects):
        for s, src_rect in enumerate(src_rects):
            common = src_rect.intersect(dst_rect)
            if common is not None:
                moves.append(KVMove(s, d, common, src_rect, dst_rect))
    return tuple(moves)


def moves_into(plan: tuple[KVMove, ...], dst_rank: int) -> tuple[KVMove, ...]:
    return tuple(m for m in plan if m.dst_rank == dst_rank)


def moves_from(plan: tuple[KVMove, ...], src_rank: int) -> tuple[KVMove, ...]:
    return tuple(m for m in plan if m.src_rank == src_rank)
