"""Validation of the recipe's `parallel` value, kept as a plain mapping for the layout code to interpret.

Accepted forms:
    "auto"                                          the planner chooses
    "seesaw" (or null)                              PP over all ranks for prefill -> TP over them for decode
    {tp: 1, pp: 1, dp: 1}                           one static layout (missing degrees are 1)
    {prefill: {pp: 2}, decode: {tp: 2}, dp: 1}      Seesaw: one layout per stage, same devices per replica
"""
from __future__ import annotations

from typing import Any, Mapping

from seesaw_ds.jobs.schema import RecipeError

_DEGREES = ("tp", "pp")


def _degrees(raw: Any, key: str, allowed: tuple[str, ...]) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        raise RecipeError(key, f"must be a mapping like {{tp: 2}}, got {raw!r}")
    out = {}
    for name, value in raw.items():
        if name not in allowed:
            raise RecipeError(f"{key}.{name}", f"is unknown; expected one of {', '.join(allowed)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RecipeError(f"{key}.{name}", f"must be an int >= 1, got {value!r}")
        out[name] = value
    return {name: out.get(name, 1) for name in allowed}


def validate_parallel(raw: Any) -> str | dict:
    """Return "auto", "seesaw" or a normalised mapping; raise RecipeError naming the bad `parallel.*` key."""
    if raw is None or raw == "seesaw":
        return "seesaw"
    if raw == "auto":
        return "auto"
    if not isinstance(raw, Mapping):
        raise RecipeError("parallel", f"must be auto, seesaw or a mapping, got {raw!r}")
    if "prefill" in raw or "decode" in raw:
        for stage in ("prefill", "decode"):
            if stage not in raw:
                raise RecipeError(f"parallel.{stage}", "is required when the other stage is given")
        for name in raw:
            if name not in ("prefill", "decode", "dp"):
                raise RecipeError(f"parallel.{name}", "is unknown; expected prefill, decode, dp")
        prefill = _degrees(raw["prefill"], "parallel.prefill", _DEGREES)
        decode = _degrees(raw["decode"], "parallel.decode", _DEGREES)
        dp = _degrees({"dp": raw.get("dp", 1)}, "parallel", ("dp",))["dp"]
        if prefill["tp"] * prefill["pp"] != decode["tp"] * decode["pp"]:
            raise RecipeError("parallel", f"prefill uses {prefill['tp'] * prefill['pp']} devices per replica "
                                          f"but decode uses {decode['tp'] * decode['pp']}; they must match")
        return {"prefill": prefill, "decode": decode, "dp": dp}
    return _degrees(raw, "parallel", ("tp", "pp", "dp"))


def data_parallel_size(parallel: str | Mapping) -> int | None:
    """Replica count fixed by the recipe, or None when it follows the world size (`auto`, `seesaw`)."""
    return None if parallel in ("auto", "seesaw") else int(parallel["dp"])


def describe_layouts(parallel: str | Mapping) -> str:
    """A short label for output rows, e.g. 'prefill=tp1pp2 decode=tp2pp1 dp=1'."""
    if parallel in ("auto", "seesaw"):
        return parallel
    if "prefill" in parallel:
        stage = lambda d: f"tp{d['tp']}pp{d['pp']}"  # noqa: E731
        return f"prefill={stage(parallel['prefill'])} decode={stage(parallel['decode'])} dp={parallel['dp']}"
    return f"tp{parallel['tp']}pp{parallel['pp']} dp={parallel['dp']}"
