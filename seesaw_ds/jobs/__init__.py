"""Offline jobs: recipes, dataset input, sharded parquet output with exactly-once resume, and the job loop."""
from seesaw_ds.jobs.inputs import InputError, PromptItem, PromptSource, open_inputs
from seesaw_ds.jobs.job import run_recipe
from seesaw_ds.jobs.outputs import (OutputError, ShardWriter, job_fingerprint, load_output, output_schema,
                                    prepare_output_dir, read_completed_ids)
from seesaw_ds.jobs.parallel_spec import data_parallel_size, describe_layouts
from seesaw_ds.jobs.recipe import Recipe, load_recipe, parse_recipe, recipe_help
from seesaw_ds.jobs.runner import JobSummary, row_seed, run_job
from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.jobs.sources import load_source, register_source

__all__ = ["InputError", "JobSummary", "OutputError", "PromptItem", "PromptSource", "Recipe", "RecipeError",
           "ShardWriter", "data_parallel_size", "describe_layouts", "job_fingerprint", "load_output", "load_recipe",
           "load_source", "open_inputs", "output_schema", "parse_recipe", "prepare_output_dir", "read_completed_ids",
           "recipe_help", "register_source", "row_seed", "run_job", "run_recipe"]
