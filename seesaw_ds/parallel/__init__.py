"""Parallel layouts, the pure re-sharding plans (weights, KV), and the weight plan's executor (`bind_views`).

The names load lazily, so the recipe checker (`seesaw_ds.jobs`, which parses layout specs through
`seesaw_ds.parallel.layout`) does not import torch for `launch/generate.py --help`."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "seesaw_ds.parallel.copy": ("bind_views",),
    "seesaw_ds.parallel.kv_plan": ("KVMove", "KVRect", "kv_ownership", "kv_reshard_plan", "moves_from",
                                   "moves_into"),
    "seesaw_ds.parallel.layout": ("Layout", "LayoutSpecError", "RankCoords", "StageLayouts", "auto_layouts",
                                  "parse_layout_spec", "resolve_layouts"),
    "seesaw_ds.parallel.weight_plan": ("AUTOTP_GRAIN_SIZE", "ShardEntry", "WeightPlan", "grain_split_sizes",
                                       "head_split_sizes", "hf_weight_shapes", "shard_entries",
                                       "stage_layer_ranges", "tp_head_ranges", "weight_plan",
                                       "whole_model_entries"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'seesaw_ds.parallel' has no attribute {name!r}")
