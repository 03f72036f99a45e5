"""One call from a recipe and a built LLM to a finished output folder (what launch scripts use).

    recipe = load_recipe(path, overrides)
    llm = LLM(config=recipe.engine_config())
    summary = run_recipe(recipe, llm, replica=r, num_replicas=dp, is_writer=..., barrier=dist_barrier)

Every rank of a replica calls `run_recipe` with the same recipe (its engine steps in lockstep); only the
replica's writer (`is_writer`) writes rows. The output folder is prepared by the writer of replica 0, and
`barrier()` (if given) must return on all ranks only after that.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from seesaw_ds.jobs.inputs import PromptSource, open_inputs
from seesaw_ds.jobs.identity import data_content_key, model_content_key
from seesaw_ds.jobs.output_lock import hold_output_lock
from seesaw_ds.jobs.fingerprint import job_fingerprint
from seesaw_ds.jobs.outputs import DiscardWriter, ShardWriter, check_resumable, output_schema, prepare_output_dir
from seesaw_ds.jobs.parallel_spec import data_parallel_size, describe_layouts
from seesaw_ds.jobs.recipe import Recipe
from seesaw_ds.jobs.runner import JobSummary, run_job
from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.jobs.tracking import Tracker


def content_fingerprint(recipe: Recipe, source: PromptSource) -> dict[str, Any]:
    """The resume fingerprint, with the content identity of the model and of the data (jobs/identity.py)."""
    return job_fingerprint(recipe, source.loaded.name, model_content_key(recipe.model.name),
                           data_content_key(source.loaded))


def claim_output_dir(recipe: Recipe, source: PromptSource, announce: Callable[[str], None] = print) -> dict:
    """Before the engine is built: lock output.dir for this process (released by `release_output_dir`) and
    check that its rows may be resumed; returns the fingerprint. Raises OutputError naming what differs."""
    if not recipe.output.dir:
        raise RecipeError("output.dir", "is required")
    fingerprint = content_fingerprint(recipe, source)
    lock = hold_output_lock(recipe.output.dir, announce)
    try:
        if not recipe.output.overwrite:
            check_resumable(lock.directory, recipe.output.resume, fingerprint)
    except BaseException:
        lock.release()
        raise
    return fingerprint


def release_output_dir(recipe: Recipe) -> None:
    """Drop the hold `claim_output_dir` took (no-op when this process holds none)."""
    from seesaw_ds.jobs.output_lock import release_held
    release_held(recipe.output.dir)


def run_recipe(recipe: Recipe, llm: Any, *, replica: int = 0, num_replicas: int | None = None,
               is_main: bool = True, is_writer: bool = True, layouts: str | None = None,
               barrier: Callable[[], None] | None = None, source: PromptSource | None = None,
               tracker: Tracker | None = None, params_factory: Callable[..., Any] | None = None,
               print_summary: bool = True, announce: Callable[[str], None] = print,
               fingerprint: dict[str, Any] | None = None, lock: bool = True) -> JobSummary:
    """Run `recipe` on `llm` (an object with .tokenizer and .engine) for one data-parallel replica.

    `source`: this replica's inputs if already opened; `tracker`: a wandb tracker owned by the caller (when
    None and `is_main`, one is made from the recipe and finished here); `is_main`: shows progress;
    `fingerprint`: as `claim_output_dir` gave it (computed here when None); `lock`: the folder's writer of
    replica 0 locks output.dir while it runs (False: the caller holds the job's lock)."""
    fixed_dp = data_parallel_size(recipe.parallel)
    num_replicas = num_replicas or fixed_dp or 1
    if fixed_dp is not None and fixed_dp != num_replicas:
        raise RecipeError("parallel.dp", f"is {fixed_dp} but the job runs {num_replicas} replicas")
    if params_factory is None:
        from seesaw_ds import SamplingParams as params_factory  # noqa: N813
    if source is None:
        source = open_inputs(recipe, llm.tokenizer, replica=replica, num_replicas=num_replicas,
                             announce=announce if replica == 0 and is_writer else (lambda _: None))
    if fingerprint is None:
        fingerprint = content_fingerprint(recipe, source)
    leader = replica == 0 and is_writer
    held = None
    if leader and lock and recipe.output.dir:
        held = hold_output_lock(recipe.output.dir, announce)
    try:
        return _run_replica(recipe, llm, source, fingerprint, leader=leader, replica=replica,
                            num_replicas=num_replicas, is_main=is_main, is_writer=is_writer, layouts=layouts,
                            barrier=barrier, tracker=tracker, params_factory=params_factory,
                            print_summary=print_summary, announce=announce)
    finally:
        if held is not None:
            held.release()


def _run_replica(recipe, llm, source, fingerprint, *, leader, replica, num_replicas, is_main, is_writer, layouts,
                 barrier, tracker, params_factory, print_summary, announce) -> JobSummary:
    if leader:
        directory = prepare_output_dir(recipe.output, fingerprint, recipe)
    if barrier is not None:
        barrier()
    if not leader:  # checks the manifest only; the leader already created or wiped the folder
        directory = prepare_output_dir(dataclasses.replace(recipe.output, overwrite=False, resume=True),
                                       fingerprint, recipe)
    n = recipe.sampling.n
    if is_writer:
        schema = output_schema(recipe.output.token_ids, source.carry_types(), recipe.sampling.logprobs is not None,
                               sample_index=n > 1)
        writer = ShardWriter(directory, replica, schema, samples_per_row=n)
    else:
        writer = DiscardWriter(directory, replica, samples_per_row=n)
    own_tracker = tracker is None
    if own_tracker:
        tracker = Tracker.for_recipe(recipe, enabled=is_main, announce=announce)
        tracker.attach(llm.engine)
    summary = run_job(recipe, source, llm.engine, writer, params_factory=params_factory,
                      model_label=recipe.model.name, layouts_label=layouts or describe_layouts(recipe.parallel),
                      show_progress=is_main, log_fn=tracker.log if tracker.active else None,
                      on_row=tracker.add_sample if tracker.active else None,
                      print_fn=print if print_summary else None)
    if own_tracker:
        tracker.finish(summary_dict(summary))
    return summary


def summary_dict(summary: JobSummary) -> dict[str, Any]:
    """A job summary as flat numbers, with the throughput properties."""
    out = {k: v for k, v in dataclasses.asdict(summary).items() if k not in ("skipped", "first_skipped_row")}
    out |= {f"skipped/{k}": v for k, v in summary.skipped.items()}
    out |= {"requests_per_s": summary.requests_per_second, "tokens_per_s": summary.tokens_per_second,
            "output_tokens_per_s": summary.output_tokens_per_second}
    return out
