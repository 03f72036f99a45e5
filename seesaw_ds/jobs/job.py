"""One call from a recipe and a built LLM to a finished output folder (what launch scripts use).

    recipe = load_recipe(path, overrides)
    llm = LLM(**recipe.llm_kwargs())
    summary = run_recipe(recipe, llm, replica=r, num_replicas=dp, is_main=(rank == 0), barrier=dist_barrier)

With several replicas, `run_recipe` must run on the one process per replica that drives the engine; the
output folder is prepared by replica 0, and `barrier()` (if given) must return on all replicas only after that.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from seesaw_ds.jobs.inputs import open_inputs
from seesaw_ds.jobs.outputs import ShardWriter, job_fingerprint, output_schema, prepare_output_dir
from seesaw_ds.jobs.parallel_spec import data_parallel_size, describe_layouts
from seesaw_ds.jobs.recipe import Recipe
from seesaw_ds.jobs.runner import JobSummary, run_job
from seesaw_ds.jobs.schema import RecipeError


class _Tracker:
    """wandb run when tracking.wandb.project is set and mode is not disabled; else nothing."""

    def __init__(self, recipe: Recipe, enabled: bool):
        cfg = recipe.tracking.wandb
        self.run = None
        if enabled and cfg.project and cfg.mode != "disabled":
            import wandb
            self.run = wandb.init(project=cfg.project, name=cfg.name, mode=cfg.mode, config=recipe.to_dict())

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def finish(self, summary: JobSummary) -> None:
        if self.run is not None:
            self.run.summary.update({"rows_written": summary.rows_written, "tokens_per_s": summary.tokens_per_second,
                                     "requests_per_s": summary.requests_per_second,
                                     "wall_seconds": summary.wall_seconds, **{f"skipped/{k}": v for k, v in
                                                                             summary.skipped.items()}})
            self.run.finish()


def run_recipe(recipe: Recipe, llm: Any, *, replica: int = 0, num_replicas: int | None = None,
               is_main: bool = True, layouts: str | None = None, barrier: Callable[[], None] | None = None,
               params_factory: Callable[..., Any] | None = None,
               announce: Callable[[str], None] = print) -> JobSummary:
    """Run `recipe` on `llm` (an object with .tokenizer and .engine) for one data-parallel replica."""
    fixed_dp = data_parallel_size(recipe.parallel)
    num_replicas = num_replicas or fixed_dp or 1
    if fixed_dp is not None and fixed_dp != num_replicas:
        raise RecipeError("parallel.dp", f"is {fixed_dp} but the job runs {num_replicas} replicas")
    if params_factory is None:
        from seesaw_ds import SamplingParams as params_factory  # noqa: N813
    source = open_inputs(recipe, llm.tokenizer, replica=replica, num_replicas=num_replicas,
                         announce=announce if replica == 0 else (lambda _: None))
    fingerprint = job_fingerprint(recipe, source.loaded.name)
    if replica == 0:
        directory = prepare_output_dir(recipe.output, fingerprint, recipe)
    if barrier is not None:
        barrier()
    if replica != 0:  # checks the manifest only; replica 0 already created or wiped the folder
        directory = prepare_output_dir(dataclasses.replace(recipe.output, overwrite=False), fingerprint, recipe)
    schema = output_schema(recipe.output.token_ids, source.carry_types(), recipe.sampling.logprobs is not None)
    writer = ShardWriter(directory, replica, schema)
    tracker = _Tracker(recipe, enabled=is_main)
    summary = run_job(recipe, source, llm.engine, writer, params_factory=params_factory,
                      model_label=recipe.model.name, layouts_label=layouts or describe_layouts(recipe.parallel),
                      show_progress=is_main, log_fn=tracker.log)
    tracker.finish(summary)
    return summary
