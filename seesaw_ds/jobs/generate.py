"""The offline generation job behind `launch/generate.py`: recipe -> layouts -> engine(s) -> output folder.

    python launch/generate.py --config recipes/arxiv.yaml data.limit=64           # one process
    deepspeed --num_gpus 2 launch/generate.py --config recipes/arxiv.yaml         # PP2 prefill -> TP2 decode

Every rank runs `main`. Set-up order (so bad input fails before weights load):
    recipe -> model folder + config + tokenizer -> layouts (planner when `auto`) -> this rank's inputs
    -> engine -> rows -> gathered report (rank 0 prints it, writes job_summary.json, finishes wandb)
A bad input ends every rank with one `error:` line (printed by rank 0) and exit status 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from seesaw_ds.jobs.cli import recipe_from_argv
from seesaw_ds.jobs.recipe import Recipe
from seesaw_ds.jobs.schema import RecipeError

PROG = "launch/generate.py"
PLANNER_SAMPLE_ROWS = 64


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (recipe, data, model path, layouts): one line, exit status 2."""
    from seesaw_ds.engine.scheduler import RequestRejected
    from seesaw_ds.jobs.inputs import InputError
    from seesaw_ds.jobs.outputs import OutputError
    from seesaw_ds.distributed.master_io import ShmSpaceError
    from seesaw_ds.distributed.private_dirs import UnsafeFolderError
    from seesaw_ds.models.config import UnsupportedArchitecture
    return RecipeError, InputError, OutputError, FileNotFoundError, RequestRejected, UnsupportedArchitecture, \
        ShmSpaceError, UnsafeFolderError


def _job_comm(world):
    """The job's communicator over every rank of the launch (the process group starts here), or the trivial
    one for one process."""
    from seesaw_ds.engine.comm import NullComm, TorchComm
    if not world.is_multi_rank:
        return NullComm()
    from seesaw_ds.distributed.builder import init_distributed
    init_distributed()
    return TorchComm()


def _from_rank0(comm, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result on every rank; a bad input on rank 0 is raised on every rank."""
    multi_rank = comm.world_size > 1

    def guarded():
        try:
            return "ok", fn()
        except bad_input_errors() as err:
            if not multi_rank:
                raise
            return "error", str(err)
    if not multi_rank:
        status, value = guarded()
    else:   # the others wait in a heartbeat, not in one collective as long as a conversion or calibration
        from seesaw_ds.engine.comm import rank0_error, rank0_heart_beaten
        ok, result = rank0_heart_beaten(comm, guarded, send_result=True)
        if not ok:
            raise rank0_error(result)
        status, value = result
    if status == "error":
        raise RecipeError("", value)
    return value


def _leave_job_comm(comm) -> None:
    """Every rank at one barrier, then the process group down (multi-rank only)."""
    if comm.world_size > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            from seesaw_ds.distributed.builder import leave_distributed
            comm.barrier()
            leave_distributed()


def _set_threads(nodes, folded_rank0: bool | None = None) -> None:
    """The machine's cores split between the ranks it runs (namespaced hosts or containers of one machine
    share its cores, whatever their LOCAL_SIZE); in a folded job (`folded_rank0` not None) all of them to
    rank 0 and one to each idle rank."""
    import torch
    from seesaw_ds.distributed.node import usable_cores
    if nodes.world_size > 1:   # NOTE: oversubscribed cores make small matmuls 10-40x slower
        cores = usable_cores()
        share = max(1, cores // nodes.machine_ranks) if folded_rank0 is None else cores if folded_rank0 else 1
        torch.set_num_threads(share)


def _load_model_meta(recipe: Recipe, comm):
    """(folder, ModelConfig, tokenizer or None); rank 0 resolves (converts) the model first."""
    from seesaw_ds.models.loader import default_cache_dir, load_model_config, load_tokenizer, resolve_model_folder
    from seesaw_ds.jobs.startup_checks import check_model_spec
    from seesaw_ds.models.config import UnsupportedArchitecture
    cache_dir = recipe.model.cache_dir or default_cache_dir()

    def resolve():
        check_model_spec(recipe)
        folder = resolve_model_folder(recipe.model.name, cache_dir)
        try:
            load_model_config(folder)       # NOTE: its error, from rank 0 only
        except UnsupportedArchitecture as err:
            raise RecipeError("model.name", f"{recipe.model.name}: {err}") from None
        return folder
    folder = _from_rank0(comm, resolve)
    return folder, load_model_config(folder), load_tokenizer(folder)


def _job_planner(recipe: Recipe, tokenizer, nodes, comm, say: Callable[[str], None]) -> tuple[Callable, Callable]:
    """plan_job(world, cfg): the planner's ranking (`planner.Plan`) of layouts on the job's cluster
    (jobs/job_cluster.py: this machine, calibrated once, announced; over several nodes, the link between
    them, probed now) for a workload measured on the first rows of the source; plan_whole(cfg): the ranking
    on one rank with every core of this machine (None where a job cannot fold: several nodes, or ranks on
    accelerators). Every rank calls this."""
    from seesaw_ds.jobs.job_cluster import job_cluster, probe_link
    planned = recipe.parallel in ("auto", "seesaw") and nodes.world_size > 1
    link = probe_link(nodes, comm, say) if planned else None
    places = None                           # every rank's node and /dev/shm, for what the planner may pick
    if planned:
        from seesaw_ds.distributed.builder import gather_places
        places = gather_places(comm)

    @functools.cache
    def job_workload(cfg) -> tuple[str, Any]:
        """The workload ("prompt/output/rows" means) and planner options, measured once."""
        from seesaw_ds.jobs.inputs import open_inputs
        from seesaw_ds.jobs.fingerprint import resolved_dtype
        from seesaw_ds.planner import PlannerOptions
        from seesaw_ds.planner.calibrate import calibration_path, is_calibrated
        if not is_calibrated(nodes.machine_ranks):
            say(f"calibrating this machine for the layout planner ({nodes.machine_ranks} ranks, once; cached in "
                f"{calibration_path(nodes.machine_ranks)})")
        probe = open_inputs(recipe, tokenizer, announce=lambda _: None)
        items = list(itertools.islice(probe.items(), PLANNER_SAMPLE_ROWS))
        if items:
            prompt = sum(len(i.prompt_token_ids) for i in items) / len(items)
            output = sum(i.max_tokens for i in items) / len(items)
            workload = f"{max(prompt, 1):.0f}/{max(output, 1):.0f}/{probe.loaded.num_rows or len(items)}"
        else:
            workload = "sharegpt-small"
        tp_inside_nodes = nodes.num_nodes > 1 and not recipe.engine.allow_cross_node_tp
        options = PlannerOptions(dtype=resolved_dtype(recipe.model.dtype),
                                 max_batched_tokens=recipe.engine.max_num_batched_tokens,
                                 max_tp=min(nodes.ranks_per_node, cfg.num_kv_heads) if tp_inside_nodes else None)
        return workload, options

    def plan_job(world_size: int, cfg):
        from seesaw_ds.planner import plan
        workload, options = job_workload(cfg)
        ranking = plan(cfg, job_cluster(nodes, link), workload, options, num_devices=world_size)
        return _placeable(ranking, places, recipe.engine.allow_cross_node_tp, cfg)

    def plan_whole(cfg):
        from deepspeed.accelerator import get_accelerator
        from seesaw_ds.planner import plan
        from seesaw_ds.planner.calibrate import whole_machine_cluster
        if nodes.num_nodes > 1 or nodes.machine_ranks != nodes.world_size or \
                get_accelerator().device_name() != "cpu":
            return None
        cluster = whole_machine_cluster(nodes.machine_ranks)
        return None if cluster is None else plan(cfg, cluster, *job_workload(cfg))
    return plan_job, plan_whole


def _placeable(ranking, places, allow_cross_node_tp: bool, cfg):
    """The planner's ranking without the layouts the ranks' nodes cannot serve (placement.py: a TP group
    across nodes, a pair whose KV would cross /dev/shm domains), which the engine would refuse."""
    from seesaw_ds.parallel.placement import placement_problems
    from seesaw_ds.planner import stage_layouts
    ranked = tuple(c for c in ranking.ranked
                   if not placement_problems(stage_layouts(c), places, allow_cross_node_tp, cfg))
    return dataclasses.replace(ranking, ranked=ranked)


def _engine_report(engine: Any) -> dict[str, Any]:
    out = {k: v for k, v in engine.stats.summary().items() if isinstance(v, (int, float, str))}
    out["switches"] = [dict(s) for s in engine.stats.switches]
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def run(recipe: Recipe, world, announce: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole job on this rank; returns the combined report (every rank gets it)."""
    from seesaw_ds.jobs.inputs import open_inputs
    from seesaw_ds.jobs.job import claim_output_dir, release_output_dir
    from seesaw_ds.jobs.job_cluster import job_nodes
    from seesaw_ds.jobs.startup_checks import check_engine_fits
    from seesaw_ds.jobs.world import choose_layouts, describe, replica_role
    from seesaw_ds.prebuild import ensure_built
    ensure_built(announce if world.rank == 0 else (lambda _: None))   # never inside the job's clock
    comm = _job_comm(world)
    main_rank = world.rank == 0
    say = announce if main_rank else (lambda _: None)
    nodes = job_nodes(world, comm)
    _set_threads(nodes)
    if not main_rank:
        import datasets
        datasets.disable_progress_bars()
    folder, cfg, tokenizer = _load_model_meta(recipe, comm)
    planners = _job_planner(recipe, tokenizer, nodes, comm, say)
    layouts, why = _from_rank0(comm, lambda: choose_layouts(recipe.parallel, world.size, cfg, *planners))
    role = replica_role(layouts, world.rank)
    if layouts.world_size < world.size:     # folded: rank 0 takes every core, the others idle
        _set_threads(nodes, folded_rank0=main_rank)
    _from_rank0(comm, lambda: check_engine_fits(recipe, cfg, layouts, role.single_process_engine))
    import torch
    threads = _count(torch.get_num_threads(), 'thread')
    shape = (f"{_count(role.num_replicas, 'replica')} of {_count(len(role.ranks), 'rank')}, {threads} per rank"
             if layouts.world_size == world.size else f"rank 0 alone on {threads}, the others idle")
    say(f"layouts: {describe(layouts)} ({_count(world.size, 'rank')}, {shape}; model {recipe.model.name} -> "
        f"{folder})")
    if why:
        say(why)
    source = None if role.idle else open_inputs(recipe, tokenizer, replica=role.replica,
                                                num_replicas=role.num_replicas, announce=say)
    fingerprint = _from_rank0(comm, lambda: claim_output_dir(recipe, source, say))   # before weights load
    try:
        return _run_engine(recipe, world, comm, layouts, role, source, fingerprint, announce)
    finally:
        if main_rank:
            release_output_dir(recipe)


def _run_engine(recipe: Recipe, world, comm, layouts, role, source, fingerprint,
                announce: Callable[[str], None]) -> dict[str, Any]:
    from seesaw_ds import LLM
    from seesaw_ds.jobs.job import run_recipe, summary_dict
    from seesaw_ds.jobs.report import combine, format_report, write_report
    from seesaw_ds.jobs.tracking import Tracker, engine_metrics
    from seesaw_ds.jobs.world import describe, row_label
    from seesaw_ds.engine.comm import rank0_beating, wait_for_rank0
    main_rank = world.rank == 0
    say = announce if main_rank else (lambda _: None)
    folded = layouts.world_size < world.size
    if role.idle:                     # folded: wait for rank 0's job (in heartbeats, not one long collective)
        wait_for_rank0(comm)
        mine = {"writer": False}
    else:
        with rank0_beating(comm) if folded else contextlib.nullcontext():
            if role.single_process_engine:
                llm = LLM(config=recipe.engine_config(), distributed=False)
            else:
                llm = LLM(config=recipe.engine_config(parallel=layouts))
            tracker = Tracker.for_recipe(recipe, enabled=main_rank, announce=say,
                                         extra_config={"layouts": describe(layouts), "world_size": world.size})
            tracker.attach(llm.engine)
            summary = run_recipe(recipe, llm, replica=role.replica, num_replicas=role.num_replicas,
                                 is_main=main_rank, is_writer=role.is_writer, layouts=row_label(layouts),
                                 barrier=None if folded else comm.barrier, source=source, tracker=tracker,
                                 print_summary=False, fingerprint=fingerprint, lock=False)
        mine = {"summary": summary_dict(summary), "engine": _engine_report(llm.engine), "writer": role.is_writer}
    gathered = [r for r in comm.all_gather_object(mine) if r["writer"]]
    report = combine(gathered, describe(layouts), world.size)
    if main_rank:
        announce(format_report(report))
        report["wandb_run_id"] = tracker.run_id
        report["wandb_dir"] = getattr(tracker.run, "dir", None)
        path = write_report(os.path.abspath(os.path.expanduser(recipe.output.dir)), report)
        announce(f"summary written to {path}")
        tracker.finish({k: v for k, v in report["total"].items() if isinstance(v, (int, float, str))}
                       | engine_metrics(llm.engine))
    _leave_job_comm(comm)  # NOTE: success only: a rank that failed alone must not wait in a barrier
    return report


def main(argv: Sequence[str] | None = None) -> int:
    try:
        recipe, _ = recipe_from_argv(argv, prog=PROG)
    except SystemExit as exit_:  # --help, or a bad recipe (already printed)
        return int(exit_.code or 0)
    from seesaw_ds.jobs.world import JobWorld
    world = JobWorld.from_env()
    try:
        run(recipe, world)
    except bad_input_errors() as err:
        if world.rank == 0:
            print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - a crash: the full story, from every rank, then one line
        traceback.print_exc()
        from seesaw_ds.distributed.liveness import say_fatal
        say_fatal(f"{type(err).__name__}: {err}")
        return 1
    return 0
