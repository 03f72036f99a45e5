"""The recipe's `parallel` value: the engine's layout-spec grammar plus the jobs-level "auto".

The grammar lives in one place, `seesaw_ds.parallel.layout` (`parse_layout_spec`), so a recipe, `LLM(parallel=)`
and the benchmarks accept the same forms; this module adds what only a job has:

    "auto"                                          the planner chooses (seesaw_ds.jobs.generate)
    "seesaw" (or null)                              PP over all ranks for prefill -> TP over them for decode
    {tp: 1, pp: 1, dp: 1}, "TP2", "1proc"           one static layout (missing degrees are 1)
    {prefill: {pp: 2}, decode: {tp: 2}, dp: 1}, "PP2->TP2"
                                                    Seesaw: one layout per stage, same devices per replica

A recipe pins a missing `dp` to 1 (one launch, one replica, unless it says otherwise); the engine instead fills
the world with replicas. The validated value stays a plain mapping: it is part of the output fingerprint.
"""
from __future__ import annotations

from typing import Any, Mapping

from seesaw_ds.jobs.schema import RecipeError
from seesaw_ds.parallel.layout import LayoutSpecError, StageLayouts, parse_layout_spec

JOB_LEVEL = ("auto", "seesaw")   # values that stay words: their layouts depend on the world (and the planner)


def validate_parallel(raw: Any) -> str | dict:
    """Return "auto", "seesaw" or the normalised mapping; raise RecipeError naming the bad `parallel.*` key."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return "auto"
    try:
        normal = parse_layout_spec(raw, also=("auto (the planner)",))
    except LayoutSpecError as err:
        raise RecipeError(err.key, err.message) from None
    if isinstance(normal, dict) and normal["dp"] is None:
        normal["dp"] = 1
    return normal


def data_parallel_size(parallel: str | Mapping) -> int | None:
    """Replica count fixed by the recipe, or None when it follows the world size (`auto`, `seesaw`)."""
    return None if parallel in JOB_LEVEL else int(parallel["dp"])


def describe_layouts(parallel: str | Mapping) -> str:
    """The `layouts` column of output rows when no resolved layouts are at hand: 'auto', 'seesaw', or
    `StageLayouts.describe(compact=True)`, e.g. 'prefill=tp1pp2 decode=tp2pp1 dp=1'."""
    if parallel in JOB_LEVEL:
        return parallel
    return StageLayouts.from_spec(parallel).describe(compact=True)
