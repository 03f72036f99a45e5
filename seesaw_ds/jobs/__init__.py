"""Offline jobs: recipes, dataset input, sharded parquet output with exactly-once resume, and the job loop.

The names load lazily, so `launch/generate.py --help` does not wait for `datasets` and `torch`."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "seesaw_ds.jobs.inputs": ("InputError", "PromptItem", "PromptSource", "open_inputs"),
    "seesaw_ds.jobs.fingerprint": ("job_fingerprint",),
    "seesaw_ds.jobs.job": ("run_recipe",),
    "seesaw_ds.jobs.outputs": ("DiscardWriter", "OutputError", "ShardWriter", "load_output", "output_schema",
                               "prepare_output_dir", "read_completed_ids"),
    "seesaw_ds.jobs.parallel_spec": ("data_parallel_size", "describe_layouts"),
    "seesaw_ds.jobs.recipe": ("Recipe", "load_recipe", "parse_recipe", "recipe_help"),
    "seesaw_ds.jobs.runner": ("JobSummary", "row_seed", "run_job"),
    "seesaw_ds.jobs.schema": ("RecipeError",),
    "seesaw_ds.jobs.sources": ("load_source", "register_source"),
    "seesaw_ds.jobs.tracking": ("Tracker",),
    "seesaw_ds.jobs.world": ("JobWorld", "ReplicaRole", "choose_layouts", "recipe_layouts", "replica_role"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'seesaw_ds.jobs' has no attribute {name!r}")
