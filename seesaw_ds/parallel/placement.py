"""Placement of a replica's ranks on nodes: which layouts the nodes the ranks landed on can serve.

Pure planning, checked at start-up before any weight loads (the builder gathers every rank's place first):

    places = [RankPlace(node="a", shm="a"), RankPlace("a", "a"), RankPlace("b", "b"), RankPlace("b", "b")]
    placement_problems(StageLayouts.from_spec("PP2->TP4"), places)
        -> [Problem("parallel.decode.tp", "decode tp=4 puts a TP group across nodes ..."), Problem("parallel", ...)]
    placement_problems(StageLayouts.from_spec("PP4->PP2xTP2"), places, cfg=cfg) -> []   # KV stays in each node

Two rules:
- A TP group all-reduces inside every layer, so it must not span nodes (their link is the slow one), unless
  the caller allows it explicitly (`allow_cross_node_tp`). PP across nodes (one activation per stage
  boundary) and DP replicas on different nodes are fine.
- A layout pair that switches (prefill layout != decode layout) hands every prompt's KV from the prefill
  ranks to the decode ranks through a host KV store, a /dev/shm file of each "shm domain" (the ranks that map
  one /dev/shm). So every move of the KV re-shard plan must stay inside one domain: PP across nodes for
  prefill with TP inside each node for decode keeps each node's layers at home (`PP4 -> PP2xTP2`), while
  `PP2 -> TP2` over two machines would move half of every layer's heads between them. Without the model
  (`cfg` None) the whole replica must share one domain. Namespaced hosts of one machine (the test cluster)
  share it; separate machines never do. No opt-in: the engine cannot serve it.

A rank's `node` is its node key (`seesaw_ds.distributed.node.node_key`); `shm` names the /dev/shm it maps
(`node.shm_domain`). Ranks are in global-rank order, as the layouts number them.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.kv_plan import kv_reshard_plan
from seesaw_ds.parallel.layout import Layout, StageLayouts

CROSS_NODE_TP_KEY = "engine.allow_cross_node_tp"   # the recipe key (EngineConfig.allow_cross_node_tp)


class RankPlace(NamedTuple):
    node: str   # node key: ranks with different keys talk over the network
    shm: str    # shared-memory domain: ranks with equal values map the same /dev/shm files


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str      # the recipe key to change: "parallel", "parallel.decode.tp", ...
    message: str  # what is wrong, naming the stage, the ranks and the nodes


class PlacementError(RecipeError):
    """Layouts the ranks' nodes cannot serve (a TP group across nodes, a switching pair across /dev/shm
    domains). A RecipeError, so a job ends with one `error:` line and exit status 2."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = tuple(problems)
        first = self.problems[0]
        super().__init__(first.key, "; ".join(p.message for p in self.problems))


def placement_problems(layouts: StageLayouts, places: Sequence[RankPlace], allow_cross_node_tp: bool = False,
                       cfg: ModelConfig | None = None) -> list[Problem]:
    """What stops `layouts` from running on ranks placed at `places` (one per global rank); [] when fine."""
    if len(places) != layouts.world_size:
        raise ValueError(f"{len(places)} rank places for layouts over {layouts.world_size} ranks")
    problems = []
    if not allow_cross_node_tp:
        stages = [("", layouts.prefill)] if layouts.is_static else [("prefill", layouts.prefill),
                                                                    ("decode", layouts.decode)]
        for stage, layout in stages:
            problem = _cross_node_tp(stage, layout, places)
            if problem is not None:
                problems.append(problem)
    if not layouts.is_static:
        problems.extend(_split_host_store(layouts, places, cfg))
    return problems


def check_placement(layouts: StageLayouts, places: Sequence[RankPlace], allow_cross_node_tp: bool = False,
                    cfg: ModelConfig | None = None) -> None:
    """Raise PlacementError (every problem in one line) unless `layouts` fit `places`."""
    problems = placement_problems(layouts, places, allow_cross_node_tp, cfg)
    if problems:
        raise PlacementError(problems)


def _cross_node_tp(stage: str, layout: Layout, places: Sequence[RankPlace]) -> Problem | None:
    """The stage's TP groups that span nodes, as one problem naming the first of them."""
    spanning = [ranks for dp in range(layout.dp) for pp in range(layout.pp)
                if len(_nodes_of(ranks := layout.tp_group_ranks(dp, pp), places)) > 1]
    if not spanning:
        return None
    key = f"parallel.{stage}.tp" if stage else "parallel.tp"
    what = f"{stage} tp={layout.tp}" if stage else f"tp={layout.tp}"
    more = f" (and {len(spanning) - 1} more TP group{'s' if len(spanning) > 2 else ''})" if len(spanning) > 1 else ""
    return Problem(key, f"{what} puts a TP group across nodes: {_where(spanning[0], places)}{more}; a TP group "
                        f"all-reduces in every layer, so it stays inside one node unless {CROSS_NODE_TP_KEY} is "
                        f"true (then it runs over the link between them)")


def _split_host_store(layouts: StageLayouts, places: Sequence[RankPlace], cfg: ModelConfig | None) -> list[Problem]:
    """Replicas of a switching pair whose KV moves cross /dev/shm domains (one problem: the first)."""
    layout = layouts.prefill

    def crosses(dp: int) -> bool:
        ranks = layout.replica_ranks(dp)
        if cfg is None:
            return len({places[r].shm for r in ranks}) > 1
        return any(places[ranks[m.src_rank]].shm != places[ranks[m.dst_rank]].shm
                   for m in kv_reshard_plan(cfg, layouts.prefill, layouts.decode))
    split = [dp for dp in range(layout.dp) if crosses(dp)]
    if not split:
        return []
    ranks = layout.replica_ranks(split[0])
    more = f" (and {len(split) - 1} more replica{'s' if len(split) > 2 else ''})" if len(split) > 1 else ""
    return [Problem("parallel", f"{layouts.describe()} switches stages through the host KV store, one /dev/shm "
                                f"that every rank of the replica maps, but replica {split[0]} spans nodes that do "
                                f"not share one: {_where(ranks, places, by='shm')}{more}, and its KV moves between "
                                "them; run a switching pair inside one node, one whose KV stays in each node (PP "
                                "across nodes -> PP x TP with TP inside each), or a static layout across nodes")]


def _nodes_of(ranks: Sequence[int], places: Sequence[RankPlace]) -> set[str]:
    return {places[r].node for r in ranks}


def _where(ranks: Sequence[int], places: Sequence[RankPlace], by: str = "node") -> str:
    """'node a (ranks 0, 1), node b (rank 2)', grouped by node key (or by shm domain, named by node keys)."""
    groups: dict[str, list[int]] = {}
    for rank in ranks:
        groups.setdefault(getattr(places[rank], by), []).append(rank)
    parts = []
    for members in groups.values():
        nodes = ", ".join(sorted({places[r].node for r in members}))
        label = "rank" if len(members) == 1 else "ranks"
        parts.append(f"node {nodes} ({label} {', '.join(map(str, members))})")
    return ", ".join(parts)
