"""The layout-spec grammar: one structural parser for recipes, `LLM(parallel=...)`, benchmarks and command lines.

Pure structure: no world size and no model are needed, so a recipe is checked when it is read and the engine,
the jobs and `evals/throughput.py` accept the same forms. `seesaw_ds.parallel.layout` builds and checks the
layouts from the normalised form (`StageLayouts.from_spec`, `resolve_layouts`) and prints them back
(`StageLayouts.describe`, `.label`, `.spec`).

    None, "seesaw"                            prefill PP -> decode TP over all ranks (sized per model)
    "1proc", "TP2", "PP2", "PP2xTP2"          one static layout ("TP1" is one process too)
    "PP2->TP2"                                prefill layout -> decode layout
    "TP2xDP2", "PP2xDP2->TP2xDP2"             with DP (one value for both stages)
    {tp: 2}, {tp: 1, pp: 2, dp: 1}            one static layout, missing degrees 1
    {prefill: {pp: 2}, decode: {tp: 2}, dp: 1}
Labels are case-insensitive. "auto" (the planner) is a jobs-level value: see seesaw_ds.jobs.parallel_spec.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_LAYOUT_KEYS = ("tp", "pp", "dp")
_STAGES = ("prefill", "decode")

_SPEC_FORMS = ("seesaw", "a label (1proc, TP2, PP2, PP2->TP2, ...)",
               "a mapping ({tp: 2}, {prefill: {pp: 2}, decode: {tp: 2}}, ...)")
_FACTOR = re.compile(r"(tp|pp|dp)(\d+)")


class LayoutSpecError(ValueError):
    """A malformed layout spec. `key` names the bad part (`parallel`, `parallel.prefill.tp`, ...), `message`
    says what is wrong with it; callers with their own error type (the recipe's) re-raise with both."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key} {message}")


def _spec_forms(*extra: str) -> str:
    """'a, b or c' over the accepted forms (and `extra` ones first), for error messages."""
    forms = (*extra, *_SPEC_FORMS)
    return ", ".join(forms[:-1]) + " or " + forms[-1]


def parse_layout_spec(spec: Any, also: tuple[str, ...] = ()) -> str | dict:
    """Check a layout spec's structure (no world or model needed) and return its normalised form.

    None / "seesaw"                      -> "seesaw" (prefill PP -> decode TP, sized by `auto_layouts`)
    {tp, pp, dp} (any subset), a label   -> {"tp": int, "pp": int, "dp": int | None}
    {prefill: {tp, pp}, decode: {tp, pp}, dp} or 'PP2->TP2'
                                         -> {"prefill": {"tp", "pp"}, "decode": {"tp", "pp"}, "dp": int | None}
    Missing degrees are 1 except `dp`, which stays None: it fills the world when one is known
    (`StageLayouts.from_spec`); a recipe pins it to 1. Raises LayoutSpecError naming the bad part; `also`
    names forms the caller takes before this parser (the recipe's "auto"), listed when no form fits."""
    if spec is None:
        return "seesaw"
    if isinstance(spec, str):
        return _parse_label(spec, also)
    if not isinstance(spec, Mapping):
        raise LayoutSpecError("parallel", f"must be {_spec_forms(*also)}, got {spec!r}")
    if not any(stage in spec for stage in _STAGES):
        return {**_degrees(spec, "parallel", _LAYOUT_KEYS), "dp": _dp(spec.get("dp"), "parallel.dp")}
    for name in spec:
        if name not in (*_STAGES, "dp"):
            raise LayoutSpecError(f"parallel.{name}", "is unknown; expected prefill, decode, dp")
    for stage in _STAGES:
        if stage not in spec:
            raise LayoutSpecError(f"parallel.{stage}", "is required when the other stage is given")
    stages = {stage: _degrees(spec[stage], f"parallel.{stage}", ("tp", "pp")) for stage in _STAGES}
    return _per_stage(stages, _dp(spec.get("dp"), "parallel.dp"), "parallel")


def _degree(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LayoutSpecError(key, f"must be an int >= 1, got {value!r}")
    return value


def _dp(value: Any, key: str) -> int | None:
    return None if value is None else _degree(value, key)


def _degrees(raw: Any, key: str, allowed: tuple[str, ...]) -> dict[str, int]:
    """`{tp, pp}` of one stage (missing ones 1); `dp` only where `allowed` has it (and then left to `_dp`)."""
    if not isinstance(raw, Mapping):
        raise LayoutSpecError(key, f"must be a mapping like {{tp: 2}}, got {raw!r}")
    for name in raw:
        if name not in allowed:
            hint = " (dp is one value for both stages: give it beside prefill and decode)" if name == "dp" else ""
            raise LayoutSpecError(f"{key}.{name}", f"is unknown; expected one of {', '.join(allowed)}{hint}")
    return {name: _degree(raw.get(name, 1), f"{key}.{name}") for name in ("tp", "pp")}


def _per_stage(stages: dict[str, dict[str, int]], dp: int | None, key: str) -> dict:
    sizes = [stages[stage]["tp"] * stages[stage]["pp"] for stage in _STAGES]
    if sizes[0] != sizes[1]:
        raise LayoutSpecError(key, f"has prefill on {sizes[0]} ranks per replica (tp*pp) but decode on "
                                   f"{sizes[1]}; they must match")
    return {**stages, "dp": dp}


def _parse_label(text: str, also: tuple[str, ...]) -> str | dict:
    """'seesaw', '1proc', or `stage` / `stage->stage` with stage = factors (TPn, PPn, DPn) joined by 'x'."""
    label = "".join(text.split()).lower()
    if label == "seesaw":
        return "seesaw"
    if label == "1proc":
        return {"tp": 1, "pp": 1, "dp": 1}
    parts = label.split("->")
    if len(parts) > 2:
        raise LayoutSpecError("parallel", f"label {text!r} has {len(parts)} stages; expected one (TP2) or "
                                          "prefill->decode (PP2->TP2)")
    if len(parts) == 1 and not all(_FACTOR.fullmatch(f) for f in label.split("x")):
        raise LayoutSpecError("parallel", f"must be {_spec_forms(*also)}, got {text!r}")
    keys = ["parallel"] if len(parts) == 1 else [f"parallel.{stage}" for stage in _STAGES]
    stages, dps = [], []
    for part, key in zip(parts, keys):
        degrees: dict[str, int] = {}
        for factor in part.split("x"):
            match = _FACTOR.fullmatch(factor)
            if match is None:
                raise LayoutSpecError(key, f"is {part!r} in label {text!r}; expected TPn, PPn or factors "
                                           "joined by x (PP2xTP2), n >= 1")
            axis, degree = match[1], int(match[2])
            if axis in degrees:
                raise LayoutSpecError(key, f"names {axis.upper()} twice in label {text!r}")
            degrees[axis] = _degree(degree, f"{key}.{axis}")
        dps.append(degrees.pop("dp", None))
        stages.append({"tp": degrees.get("tp", 1), "pp": degrees.get("pp", 1)})
    given = {d for d in dps if d is not None}
    if len(given) > 1:
        raise LayoutSpecError("parallel.dp", f"differs between the stages of label {text!r}; DP is fixed")
    dp = given.pop() if given else None
    if len(stages) == 1:
        return {**stages[0], "dp": dp}
    return _per_stage(dict(zip(_STAGES, stages)), dp, "parallel")
