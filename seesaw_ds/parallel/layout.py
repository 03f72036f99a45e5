"""Parallel layouts: how the ranks of one node split a model, per stage (prefill / decode).

A layout is `tp x pp x dp`. One model replica spans `tp * pp` consecutive global ranks; DP copies the
replica. Inside a replica the tensor-parallel rank varies fastest:

    global rank = (dp_index * pp + pp_stage) * tp + tp_rank
    e.g. tp=2, pp=2, dp=2:  rank | 0 1 2 3 | 4 5 6 7
                            dp   | 0 0 0 0 | 1 1 1 1
                            pp   | 0 0 1 1 | 0 0 1 1
                            tp   | 0 1 0 1 | 0 1 0 1

This is DeepSpeed's `ProcessTopology(axes=["data", "pipe", "model"], dims=[dp, pp, tp])` order (the last axis
varies fastest); `Layout.topology_axes()` returns exactly those arguments.

Specs (recipes, `LLM(parallel=...)`, benchmark labels such as "PP2->TP2") are parsed by
`layout_spec.parse_layout_spec` (re-exported here); `resolve_layouts` turns any of them into StageLayouts for
a world and a model, and `StageLayouts.describe` / `.label` / `.spec` are the only printers.

NOTE: Seesaw keeps DP fixed across stages, so prefill and decode use the same replicas (same `dp`, same
`tp * pp`): KV and weight re-sharding never crosses a replica boundary.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

from seesaw_ds.parallel.layout_spec import LayoutSpecError, parse_layout_spec

if TYPE_CHECKING:  # annotations only: the spec checks of a recipe must not wait for torch
    from seesaw_ds.models.config import ModelConfig

_LAYOUT_KEYS = ("tp", "pp", "dp")
__all__ = ["Layout", "LayoutSpecError", "RankCoords", "StageLayouts", "auto_layouts", "parse_layout_spec",
           "resolve_layouts"]


class RankCoords(NamedTuple):
    dp_index: int   # which replica
    pp_stage: int   # pipeline stage inside the replica
    tp_rank: int    # tensor-parallel rank inside the stage
    local_rank: int  # position inside the replica: pp_stage * tp + tp_rank


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1

    def __post_init__(self):
        for name in _LAYOUT_KEYS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Layout.{name} must be a positive integer, got {value!r}")

    @property
    def ranks_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}"

    # ---- rank mapping --------------------------------------------------------------------------------
    def coords(self, global_rank: int) -> RankCoords:
        if not 0 <= global_rank < self.world_size:
            raise ValueError(f"rank {global_rank} outside layout {self.describe()} (world size {self.world_size})")
        dp_index, local = divmod(global_rank, self.ranks_per_replica)
        pp_stage, tp_rank = divmod(local, self.tp)
        return RankCoords(dp_index, pp_stage, tp_rank, local)

    def global_rank(self, dp_index: int, pp_stage: int = 0, tp_rank: int = 0) -> int:
        for name, value, bound in (("dp_index", dp_index, self.dp), ("pp_stage", pp_stage, self.pp),
                                   ("tp_rank", tp_rank, self.tp)):
            if not 0 <= value < bound:
                raise ValueError(f"{name}={value} outside [0, {bound}) for layout {self.describe()}")
        return (dp_index * self.pp + pp_stage) * self.tp + tp_rank

    def replica_ranks(self, dp_index: int) -> list[int]:
        """Global ranks of one replica, in local-rank order."""
        return [self.global_rank(dp_index, s, t) for s in range(self.pp) for t in range(self.tp)]

    def tp_group_ranks(self, dp_index: int, pp_stage: int) -> list[int]:
        return [self.global_rank(dp_index, pp_stage, t) for t in range(self.tp)]

    def pp_group_ranks(self, dp_index: int, tp_rank: int) -> list[int]:
        return [self.global_rank(dp_index, s, tp_rank) for s in range(self.pp)]

    def topology_axes(self) -> tuple[list[str], list[int]]:
        """`(axes, dims)` for `deepspeed.runtime.pipe.topology.ProcessTopology` matching this rank order."""
        return ["data", "pipe", "model"], [self.dp, self.pp, self.tp]

    # ---- checks against a machine and a model --------------------------------------------------------
    def validate(self, world_size: int, cfg: ModelConfig, stage: str = "layout") -> None:
        label = f"{stage} " if stage else ""
        if self.ranks_per_replica > world_size:
            what = " ".join(f"{k}={getattr(self, k)}" for k in ("tp", "pp") if getattr(self, k) > 1)
            raise ValueError(f"{label}{what} needs {self.ranks_per_replica} ranks per replica; "
                             f"world size is {world_size}")
        if self.world_size != world_size:
            raise ValueError(f"{label}{self.describe()} covers {self.world_size} ranks; world size is {world_size}")
        if self.pp > cfg.num_layers:
            raise ValueError(f"{label}pp={self.pp} exceeds the model's {cfg.num_layers} layers")
        if self.tp > cfg.num_kv_heads:
            raise ValueError(f"{label}tp={self.tp} exceeds the model's {cfg.num_kv_heads} KV heads")


@dataclasses.dataclass(frozen=True)
class StageLayouts:
    prefill: Layout
    decode: Layout

    def __post_init__(self):
        for name, layout in (("prefill", self.prefill), ("decode", self.decode)):
            if not isinstance(layout, Layout):
                raise TypeError(f"StageLayouts.{name} must be a Layout, got {type(layout).__name__}")
        if self.prefill.dp != self.decode.dp:
            raise ValueError(f"StageLayouts.decode: dp={self.decode.dp} differs from prefill dp={self.prefill.dp}; "
                             "DP stays fixed across stages")
        if self.prefill.ranks_per_replica != self.decode.ranks_per_replica:
            raise ValueError(f"StageLayouts.decode: tp*pp={self.decode.ranks_per_replica} differs from prefill "
                             f"tp*pp={self.prefill.ranks_per_replica}; both stages must use the same ranks per replica")

    @classmethod
    def static(cls, layout: Layout) -> "StageLayouts":
        return cls(prefill=layout, decode=layout)

    @classmethod
    def from_spec(cls, spec: Any, world_size: int | None = None) -> "StageLayouts":
        """The layouts an explicit spec names (any form `parse_layout_spec` takes but "seesaw", which depends on
        the model: see `resolve_layouts`). No `dp` in the spec: the replicas fill `world_size` (1 when None);
        a world that is no multiple of the replica is left for `validate` to report."""
        normal = parse_layout_spec(spec)
        if normal == "seesaw":
            raise LayoutSpecError("parallel", "is seesaw: its layouts depend on the model; use resolve_layouts")
        stages = (normal["prefill"], normal["decode"]) if "prefill" in normal else (normal, normal)
        dp = normal["dp"]
        if dp is None:
            dp = max(1, (world_size or 1) // (stages[0]["tp"] * stages[0]["pp"]))
        prefill, decode = (Layout(tp=s["tp"], pp=s["pp"], dp=dp) for s in stages)
        return cls(prefill=prefill, decode=decode)

    @property
    def is_static(self) -> bool:
        return self.prefill == self.decode

    @property
    def world_size(self) -> int:
        return self.prefill.world_size

    def validate(self, world_size: int, cfg: ModelConfig) -> None:
        self.prefill.validate(world_size, cfg, stage="prefill")
        self.decode.validate(world_size, cfg, stage="decode")

    # ---- printing: the one place that turns layouts into text ---------------------------------------------
    def spec(self) -> dict:
        """The normalised mapping (`parse_layout_spec`'s form, dp given): JSON-ready, and parses back to self."""
        dp = self.prefill.dp
        if self.is_static:
            return {"tp": self.prefill.tp, "pp": self.prefill.pp, "dp": dp}
        return {"prefill": {"tp": self.prefill.tp, "pp": self.prefill.pp},
                "decode": {"tp": self.decode.tp, "pp": self.decode.pp}, "dp": dp}

    def describe(self, compact: bool = False) -> str:
        """Logs: 'prefill tp=1 pp=2 dp=1 -> decode tp=2 pp=1 dp=1', or one layout when both stages share it.

        `compact=True` is the `layouts` column of job output rows (part of their fingerprint, so its format
        stays fixed): 'prefill=tp1pp2 decode=tp2pp1 dp=1', or 'tp2pp1 dp=1' when static."""
        if compact:
            stage = lambda layout: f"tp{layout.tp}pp{layout.pp}"  # noqa: E731
            if self.is_static:
                return f"{stage(self.prefill)} dp={self.prefill.dp}"
            return f"prefill={stage(self.prefill)} decode={stage(self.decode)} dp={self.prefill.dp}"
        if self.is_static:
            return self.prefill.describe()
        return f"prefill {self.prefill.describe()} -> decode {self.decode.describe()}"

    def label(self) -> str:
        """The short form benchmarks and command lines use: '1proc', 'TP2', 'PP2', 'PP2->TP2', 'PP2xTP2',
        'TP2xDP2' (DP, when > 1, is written in every stage). `parse_layout_spec` reads it back."""
        def stage(layout: Layout) -> str:
            factors = [f"{axis.upper()}{getattr(layout, axis)}" for axis in ("pp", "tp", "dp")
                       if getattr(layout, axis) > 1]
            return "x".join(factors) or "TP1"
        if self.is_static:
            return "1proc" if self.prefill.world_size == 1 else stage(self.prefill)
        return f"{stage(self.prefill)}->{stage(self.decode)}"


# ---- against a world and a model ----------------------------------------------------------------------------
def auto_layouts(world_size: int, cfg: ModelConfig) -> StageLayouts:
    """Default when nothing is pinned: prefill PP, decode TP, over the largest replica that fits the model.

    The replica size R is the largest divisor of `world_size` with R <= layers (for pp=R) and
    R <= KV heads (for tp=R); the rest of the world becomes DP. World 1 -> everything 1.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    limit = min(world_size, cfg.num_layers, cfg.num_kv_heads)
    replica = max(r for r in range(1, limit + 1) if world_size % r == 0)
    dp = world_size // replica
    return StageLayouts(prefill=Layout(pp=replica, dp=dp), decode=Layout(tp=replica, dp=dp))


def resolve_layouts(spec: Any, world_size: int, cfg: ModelConfig) -> StageLayouts:
    """Any layout spec (see `parse_layout_spec`; None or "seesaw" -> `auto_layouts`) as StageLayouts checked
    against the world and the model. Raises ValueError: LayoutSpecError for a malformed spec, else a misfit
    naming the stage (e.g. 'decode tp=4 exceeds the model's 3 KV heads')."""
    if isinstance(spec, StageLayouts):
        layouts = spec
    elif parse_layout_spec(spec) == "seesaw":
        return auto_layouts(world_size, cfg)
    else:
        layouts = StageLayouts.from_spec(spec, world_size)
    layouts.validate(world_size, cfg)
    return layouts
