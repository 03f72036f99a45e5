"""Parallel layouts and the pure re-sharding plans (weights, KV) with their small copy executors."""
from seesaw_ds.parallel.copy import (apply_kv_moves, assemble_full, materialize_rank, materialize_shard,
                                     read_from_store, write_to_store)
from seesaw_ds.parallel.kv_plan import KVMove, KVRect, kv_ownership, kv_reshard_plan, moves_from, moves_into
from seesaw_ds.parallel.layout import Layout, RankCoords, StageLayouts, auto_layouts, resolve_layouts
from seesaw_ds.parallel.weight_plan import (AUTOTP_GRAIN_SIZE, ShardEntry, WeightPlan, grain_split_sizes,
                                            head_split_sizes, hf_weight_shapes, shard_entries,
                                            stage_layer_ranges, tp_head_ranges, weight_plan)

__all__ = [
    "AUTOTP_GRAIN_SIZE", "KVMove", "KVRect", "Layout", "RankCoords", "ShardEntry", "StageLayouts", "WeightPlan",
    "apply_kv_moves", "assemble_full", "auto_layouts", "grain_split_sizes", "head_split_sizes",
    "hf_weight_shapes", "kv_ownership", "kv_reshard_plan", "materialize_rank", "materialize_shard",
    "moves_from", "moves_into", "read_from_store", "resolve_layouts", "shard_entries", "stage_layer_ranges",
    "tp_head_ranges", "weight_plan", "write_to_store",
]
