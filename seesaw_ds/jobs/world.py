"""Where a rank of a job stands: the launcher's world, the recipe's layouts, and this rank's replica role.

Pure functions; the launch script supplies the environment and the planner.

    world = JobWorld.from_env()                            # RANK / WORLD_SIZE / LOCAL_SIZE of the launcher
    layouts, why = choose_layouts(recipe.parallel, world.size, cfg, plan_job)   # why: for the start-up line
    role = replica_role(layouts, world.rank)               # replica index, writer or not

One engine spans the `tp * pp` consecutive ranks of a replica; replicas split the rows (row i goes to replica
i mod dp). The writer of a replica is its first rank; its other ranks step the engine in lockstep and drop rows.

    world 2, {prefill: {pp: 2}, decode: {tp: 2}}:   rank 0 1 | replica 0 0 | writer yes no
    world 2, {dp: 2}:                               rank 0 1 | replica 0 1 | writer yes yes
    world 2, folded (one rank on every core):        rank 0 1 | replica 0 - | writer yes no (rank 1 idles)

Folded: where the planner predicts one rank with a thread per core of the machine (`plan_whole`) at least
`FOLD_MARGIN` times as fast as the N-rank layouts it would run, rank 0 runs the job alone and the other
ranks wait: on one machine whose cores share a memory bus, replicas each read every weight per step and TP
pays an all-reduce per layer, which one process with every core pays neither of.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.layout import Layout, StageLayouts, auto_layouts


@dataclasses.dataclass(frozen=True)
class JobWorld:
    rank: int = 0
    size: int = 1
    local_size: int = 1      # ranks on this node

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"JobWorld.rank {self.rank} is outside a world of {self.size}")
        if self.local_size < 1:
            raise ValueError(f"JobWorld.local_size must be >= 1, got {self.local_size}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "JobWorld":
        size = int(env.get("WORLD_SIZE", "1"))
        return cls(rank=int(env.get("RANK", "0")), size=size, local_size=int(env.get("LOCAL_SIZE", str(size))))

    @property
    def is_multi_rank(self) -> bool:
        return self.size > 1


@dataclasses.dataclass(frozen=True)
class ReplicaRole:
    replica: int             # which replica this rank serves (its rows: index mod num_replicas == replica)
    num_replicas: int
    ranks: tuple[int, ...]   # global ranks of the replica; ranks[0] writes
    rank: int

    @property
    def is_writer(self) -> bool:
        return self.rank == self.ranks[0]

    @property
    def single_process_engine(self) -> bool:
        return len(self.ranks) == 1

    @property
    def idle(self) -> bool:
        """A rank outside a folded job's layouts: it runs no engine and waits for rank 0."""
        return self.rank not in self.ranks


def replica_role(layouts: StageLayouts, rank: int) -> ReplicaRole:
    if rank >= layouts.world_size:          # folded: the layouts run on fewer ranks than the world has
        return ReplicaRole(0, layouts.prefill.dp, tuple(layouts.prefill.replica_ranks(0)), rank)
    coords = layouts.prefill.coords(rank)
    return ReplicaRole(coords.dp_index, layouts.prefill.dp, tuple(layouts.prefill.replica_ranks(coords.dp_index)),
                       rank)


def supported(layouts: StageLayouts) -> bool:
    """One engine spans the whole world (dp = 1), or every rank runs its own engine (tp = pp = 1)."""
    return layouts.prefill.dp == 1 or layouts.prefill.ranks_per_replica == 1


def recipe_layouts(parallel: str | Mapping[str, Any], world_size: int, cfg: ModelConfig,
                   plan_job: Callable[[int, ModelConfig], Any] | None = None) -> StageLayouts:
    """`choose_layouts` without the reason."""
    return choose_layouts(parallel, world_size, cfg, plan_job)[0]


def choose_layouts(parallel: str | Mapping[str, Any], world_size: int, cfg: ModelConfig,
                   plan_job: Callable[[int, ModelConfig], Any] | None = None,
                   plan_whole: Callable[[ModelConfig], Any] | None = None) -> tuple[StageLayouts, str]:
    """The recipe's `parallel` (validated by the recipe) as StageLayouts checked against the world and model,
    and why they were chosen: the start-up line ("" when the recipe named them).

    `plan_job(world_size, cfg)` is the planner's ranking (a `planner.Plan`) for this job's workload.
    `auto`: one rank -> tp=pp=dp=1; several -> the planner's fastest layouts one launch can run. `seesaw`:
    prefill PP -> decode TP over the largest replica the model allows (`auto_layouts`), unless the planner
    predicts a static layout faster (`seesaw_or_static`); one rank -> tp=pp=dp=1. Either, on several ranks:
    one rank alone (tp=pp=dp=1, the others idle) where `plan_whole(cfg)`, the ranking for one rank with
    every core of the machine (None where folding does not apply), predicts it FOLD_MARGIN times as fast
    (`fold_or_keep`). Misfits raise RecipeError."""
    why = ""
    if world_size == 1 and parallel in ("auto", "seesaw"):
        return StageLayouts.static(Layout()), why
    if parallel == "auto" and plan_job is None:
        raise RecipeError("parallel", "is auto but no planner is at hand; give the layouts")
    if parallel in ("auto", "seesaw"):
        plan = plan_job(world_size, cfg) if plan_job is not None else None
        if parallel == "auto":
            layouts, why = fastest_runnable(plan)
        else:
            layouts = auto_layouts(world_size, cfg)
            if plan is not None:
                layouts, why = seesaw_or_static(plan, layouts)
        whole = plan_whole(cfg) if plan_whole is not None and plan is not None else None
        if whole is not None:
            layouts, why = fold_or_keep(plan, layouts, why, whole, parallel)
        if layouts.world_size < world_size:
            return layouts, why
    else:
        layouts = StageLayouts.from_spec(parallel, world_size)
    try:
        layouts.validate(world_size, cfg)
    except ValueError as err:
        raise RecipeError("parallel", f"does not fit: {err} (launch with `deepspeed --num_gpus "
                                      f"{layouts.world_size}` or change the layouts)") from None
    if not supported(layouts):
        raise RecipeError("parallel", f"{describe(layouts)} runs {layouts.prefill.dp} replicas of "
                                      f"{layouts.prefill.ranks_per_replica} ranks; one launch runs either one "
                                      f"replica over all ranks (dp: 1) or one rank per replica (tp = pp = 1)")
    return layouts, why


def _runnable(plan, static_only: bool = False) -> list:
    from seesaw_ds.planner import stage_layouts
    return [c for c in plan.ranked if supported(stage_layouts(c)) and (c.is_static or not static_only)]


def _candidate(plan, layouts: StageLayouts):
    """The planner's candidate for `layouts` in `plan`, or None when it ranks none."""
    from seesaw_ds.planner import stage_layouts
    return next((c for c in plan.ranked if stage_layouts(c) == layouts), None)


def _shape(plan) -> str:
    w = plan.workload
    return (f"{w.num_requests} requests of ~{w.mean_prompt_len:.0f} prompt + {w.mean_output_len:.0f} output "
            f"tokens on {plan.cluster.num_devices}x{plan.cluster.name}")


def fastest_runnable(plan) -> tuple[StageLayouts, str]:
    """`auto`: the planner's fastest layouts that one launch can run."""
    from seesaw_ds.planner import stage_layouts
    ranked = _runnable(plan)
    if not ranked:
        raise RecipeError("parallel", f"auto found no layouts for {plan.cluster.num_devices} ranks that one "
                                      f"launch can run")
    best = ranked[0]
    return stage_layouts(best), (f"parallel: auto: the planner's fastest for {_shape(plan)} "
                                 f"({best.tokens_per_s:,.0f} tokens/s predicted)")


# A pair must be predicted this much faster than the best static layout to be run: the planner's predicted
# ratios have been off by up to 20% on measured layouts (README, "Several nodes"), and a tie is no reason to
# re-shard.
PAIR_MARGIN = 1.10


def seesaw_or_static(plan, pair: StageLayouts) -> tuple[StageLayouts, str]:
    """`seesaw` on several ranks: the Seesaw pair where the planner predicts it at least PAIR_MARGIN times
    as fast as every static layout one launch can run, else the fastest of those (a re-shard that cannot pay
    for itself is not made: on fast links and small models data-parallel replicas can beat any pair)."""
    from seesaw_ds.planner import stage_layouts
    statics = _runnable(plan, static_only=True)
    mine = _candidate(plan, pair)
    if not statics:
        return pair, ""
    static = statics[0]
    label = stage_layouts(static).label()
    if mine is None:
        max_tp = plan.options.max_tp
        why = (f"its TP group would span nodes (TP at most {max_tp} here; engine.allow_cross_node_tp lifts it)"
               if max_tp and max(pair.prefill.tp, pair.decode.tp) > max_tp else "the planner finds no room for it")
        return stage_layouts(static), f"parallel: seesaw runs {label}, not the pair {pair.label()}: {why} " \
                                      f"({_shape(plan)})"
    ratio = mine.tokens_per_s / static.tokens_per_s
    if ratio >= PAIR_MARGIN:
        return pair, (f"parallel: seesaw: the planner predicts {pair.label()} at {ratio:.2f}x {label}, the fastest "
                      f"static layout")
    return stage_layouts(static), (
        f"parallel: seesaw runs {label}, not the pair {pair.label()}: the planner predicts the pair at "
        f"{ratio:.2f}x of it for {_shape(plan)}, under the {PAIR_MARGIN:.2f}x a re-shard must promise (a pair "
        f"gains where links are slow against compute); `parallel: {pair.label()}` runs the pair anyway")


# One rank on every core is run where predicted at least this fast against the N-rank layouts: a predicted tie
# folds, since one process holds one copy of the weights and pays no all-reduce or re-shard (on a 2-core
# machine the planner's one-rank / DP2 ratio was within 8% of the shipped recipes' measured one, README).
FOLD_MARGIN = 1.0


def fold_or_keep(plan, layouts: StageLayouts, why: str, whole, parallel: str) -> tuple[StageLayouts, str]:
    """One rank with every core (`whole`: its one-device ranking) where predicted at least FOLD_MARGIN times
    the N-rank `layouts` (chosen from `plan` for the reason `why`), else those layouts and reason."""
    mine = _candidate(plan, layouts)
    if mine is None or not whole.ranked:
        return layouts, why
    ratio = whole.best.tokens_per_s / mine.tokens_per_s
    if ratio < FOLD_MARGIN:
        return layouts, why
    n = plan.cluster.num_devices
    idle = "rank 1" if n == 2 else f"ranks 1-{n - 1}"
    return StageLayouts.static(Layout()), (
        f"parallel: {parallel} runs one rank on every core ({whole.cluster.name}), {idle} idle: the "
        f"planner predicts it at {ratio:.2f}x {layouts.label()}, its choice on {n} ranks, for {_shape(plan)} "
        f"(no replica re-reads the weights, no all-reduce, no re-shard); give the layouts to run them anyway")


def describe(layouts: StageLayouts) -> str:
    """'prefill tp=1 pp=2 dp=1 -> decode tp=2 pp=1 dp=1', or one layout when both stages share it."""
    return layouts.describe()


def row_label(layouts: StageLayouts) -> str:
    """The `layouts` column of the output rows, e.g. 'prefill=tp1pp2 decode=tp2pp1 dp=1' (fingerprinted)."""
    return layouts.describe(compact=True)
