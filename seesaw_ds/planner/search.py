"""Pick the prefill and decode layouts: every static layout and every re-sharded pair, ranked.

Workload model (means only):
- Prefill pushes all `n * P` prompt tokens, decode produces `n * O` tokens; the two stages add up. With the
  requests' output lengths, decode is the engine's staircase of steps (`workload.decode_schedule`): each
  step costed at the batch it runs, short requests leaving a tail of small-batch steps.
- A stage runs at the batch the memory allows (`batch_limit` at the mean decode context P + O/2), capped
  by the number of requests; a prefill step also by the engine's token budget per step. Decode steps see
  that mean context. Pipeline passes use the engine's micro-batch counts (`PlannerOptions`): a static
  layout's decode over single-rank stages keeps pp micro-batches in flight across steps (no bubble), any
  other decode step is one pass that fills and drains the pipeline; a pipelined prefill stage streams windows of
  `prefill_window_tokens` through one pass each, cut as the engine cuts it (parallel/micro_batches.py:
  about one micro-batch per 1024 tokens, at most `prefill_micro_batches`), so its bubble is paid once per
  window (close to the steady-state pipeline), not once per step budget. Prefill without a pipeline runs
  its step as one batch.
- Static layout: KV stays on the device, no switches.
- Re-sharded pair (Seesaw): same dp in both stages; by default the decode layout has no more pipeline
  stages than the prefill one, as in the paper. Prefill writes each prompt's KV to the host tier; decode
  reads it back. The host tier holds `host_kv_fraction` of the host memory minus one master copy of the
  weights, so the workload needs ceil(prompt KV / capacity) prefill->decode cycles. Each switch re-loads
  every device's new weight shard from the host copy over its host link (devices in parallel). KV host
  traffic overlaps the stage that makes or consumes it; only the part longer than that stage counts.
"""
from __future__ import annotations

import dataclasses
import math

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.parallel.micro_batches import (DECODE_MICRO_BATCHES, PREFILL_MICRO_TOKENS, PREFILL_WINDOW,
                                              prefill_micro_batch_count)
from seesaw_ds.planner import roofline as rl
from seesaw_ds.planner.clusters import ClusterSpec, canonical_dtype, dtype_bytes
from seesaw_ds.planner.workload import WorkloadSpec, decode_schedule


@dataclasses.dataclass(frozen=True)
class PlannerOptions:
    dtype: str = "bfloat16"
    memory_utilization: float = 0.9     # device memory share for weights + KV (rest: activations, runtime)
    host_kv_fraction: float = 0.9       # host memory share for the KV tier + the weight master copy
    overlap_host_transfers: bool = True  # KV host traffic hides behind compute (asynchronous pipelining)
    decode_pp_at_most_prefill_pp: bool = True
    max_tp: int | None = None           # None: num_kv_heads
    # What the engine does (seesaw_ds.distributed.pipe_executor): pipeline micro-batches per prefill step,
    # per decode step (None: pp), prompt tokens per prefill step (None: no budget), and prompt tokens per
    # prefill step where prefill is a pipeline (its stream window; None: the step budget applies).
    prefill_micro_batches: int | None = PREFILL_WINDOW
    decode_micro_batches: int | None = DECODE_MICRO_BATCHES
    max_batched_tokens: int | None = 8192
    prefill_window_tokens: int | None = PREFILL_WINDOW * PREFILL_MICRO_TOKENS
    pipeline_drains: bool = True        # False: the paper's steady-state pipeline (no bubble per step)
    # a static layout's decode under a pipeline of single-rank stages keeps pp micro-batches in flight
    # across steps (engine/in_flight.py): pp micro-batches per step, no bubble; pairs pass once per step
    decode_in_flight: bool = True

    def __post_init__(self):
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        for field in ("memory_utilization", "host_kv_fraction"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"PlannerOptions.{field} must be in (0, 1], got {getattr(self, field)}")
        for field in ("max_tp", "prefill_micro_batches", "decode_micro_batches", "max_batched_tokens",
                      "prefill_window_tokens"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"PlannerOptions.{field} must be >= 1 or None, got {value}")


@dataclasses.dataclass(frozen=True)
class StageEstimate:
    stage: str
    degrees: rl.Degrees        # (tp, pp, dp)
    batch: int                 # sequences per step used for the estimate
    batch_limit: int           # memory bound b_max
    seq_len: float             # tokens per prompt (prefill) or mean context (decode)
    step: rl.TimeBreakdown     # seconds of one step
    total: rl.TimeBreakdown | None = None   # the whole stage, when not (tokens / tokens_per_step) steps

    def __post_init__(self):
        if self.stage not in rl.STAGES:
            raise ValueError(f"StageEstimate.stage must be one of {rl.STAGES}, got {self.stage!r}")
        if not 1 <= self.batch <= self.batch_limit:
            raise ValueError(f"StageEstimate.batch={self.batch} must be in [1, batch_limit={self.batch_limit}]")

    @property
    def tokens_per_step(self) -> float:
        return self.batch * (self.seq_len if self.stage == rl.PREFILL else 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step.total


@dataclasses.dataclass(frozen=True)
class LayoutPlan:
    """One candidate: a static layout (prefill.degrees == decode.degrees, no host tier) or a pair."""
    prefill: StageEstimate
    decode: StageEstimate
    workload: WorkloadSpec
    time: rl.TimeBreakdown     # whole workload, seconds by term
    num_switches: int

    def __post_init__(self):
        if self.prefill.stage != rl.PREFILL or self.decode.stage != rl.DECODE:
            raise ValueError("LayoutPlan.prefill/decode must be a prefill and a decode StageEstimate")
        if self.prefill.degrees[2] != self.decode.degrees[2]:
            raise ValueError(f"LayoutPlan: dp differs between stages {self.prefill.degrees} -> "
                             f"{self.decode.degrees}")

    @property
    def is_static(self) -> bool:
        return self.prefill.degrees == self.decode.degrees

    @property
    def tokens_per_s(self) -> float:
        """Prompt + output tokens per second."""
        return self.workload.total_tokens / self.time.total

    @property
    def output_tokens_per_s(self) -> float:
        return self.workload.output_tokens / self.time.total

    @property
    def label(self) -> str:
        return (format_degrees(self.prefill.degrees) if self.is_static else
                f"{format_degrees(self.prefill.degrees)} -> {format_degrees(self.decode.degrees)}")


@dataclasses.dataclass(frozen=True)
class Plan:
    model: ModelConfig
    cluster: ClusterSpec
    workload: WorkloadSpec
    options: PlannerOptions
    ranked: tuple[LayoutPlan, ...]        # statics and pairs, fastest first
    best_static: LayoutPlan
    best_pair: LayoutPlan | None          # None when no re-sharded pair fits

    @property
    def best(self) -> LayoutPlan:
        return self.ranked[0]

    def speedup(self, candidate: LayoutPlan) -> float:
        return candidate.tokens_per_s / self.best_static.tokens_per_s


def format_degrees(degrees: rl.Degrees) -> str:
    tp, pp, dp = degrees
    return f"TP{tp}xPP{pp}xDP{dp}"


def estimate_stage(cfg: ModelConfig, cluster: ClusterSpec, degrees: rl.Degrees, stage: str,
                   workload: WorkloadSpec, options: PlannerOptions, in_flight: bool = False) -> StageEstimate | None:
    """The stage at the memory-bound batch; None when the layout does not fit (weights or one sequence).
    `in_flight`: decode keeps the pipeline full across steps (where `in_flight_decode` says it can)."""
    limit = rl.batch_limit(cfg, cluster, degrees, workload.decode_context_len, options.dtype,
                           options.memory_utilization)
    if limit < 1:
        return None
    batch = min(limit, workload.num_requests)
    if stage == rl.PREFILL:
        seq_len, micro_batches = workload.mean_prompt_len, options.prefill_micro_batches
        budget = options.max_batched_tokens
        if budget and degrees[1] > 1 and options.prefill_window_tokens:
            budget = max(budget, options.prefill_window_tokens)     # the pipeline's stream window
        if budget:
            batch = max(1, min(batch, int(budget * degrees[2] // seq_len)))
        if degrees[1] == 1:
            micro_batches = 1
        elif micro_batches:
            micro_batches = prefill_micro_batch_count(batch / degrees[2] * seq_len, micro_batches)
    else:
        seq_len, micro_batches = workload.decode_context_len, options.decode_micro_batches
    pipe = dict(drains=options.pipeline_drains)
    if stage == rl.DECODE and in_flight and in_flight_decode(degrees, options):
        micro_batches, pipe = degrees[1], dict(drains=False, pipe_messages=rl.IN_FLIGHT_MESSAGES)
    step = rl.stage_step_time(cfg, cluster, degrees, stage, batch, seq_len, options.dtype, micro_batches, **pipe)
    total = None
    if stage == rl.DECODE and workload.output_lens:
        total = rl.TimeBreakdown()
        for size, steps in decode_schedule(workload.output_lens, limit).items():
            at_size = rl.stage_step_time(cfg, cluster, degrees, stage, size, seq_len, options.dtype,
                                         micro_batches, **pipe)
            total = total + at_size.scaled(steps)
    return StageEstimate(stage, degrees, batch, limit, seq_len, step, total)


def in_flight_decode(degrees: rl.Degrees, options: PlannerOptions) -> bool:
    """Whether the engine's static decode under `degrees` keeps micro-batches in flight across steps."""
    return options.decode_in_flight and degrees[0] == 1 and degrees[1] > 1


def stage_totals(prefill: StageEstimate, decode: StageEstimate, workload: WorkloadSpec):
    """(prefill, decode) TimeBreakdowns of the whole workload."""
    prefill_time = prefill.step.scaled(workload.prompt_tokens / prefill.tokens_per_step)
    decode_time = decode.total or decode.step.scaled(workload.output_tokens / decode.tokens_per_step)
    return prefill_time, decode_time


def evaluate_static(prefill: StageEstimate, decode: StageEstimate, workload: WorkloadSpec) -> LayoutPlan:
    prefill_time, decode_time = stage_totals(prefill, decode, workload)
    return LayoutPlan(prefill, decode, workload, prefill_time + decode_time, num_switches=0)


def host_kv_capacity(cfg: ModelConfig, cluster: ClusterSpec, options: PlannerOptions) -> float:
    """Bytes of KV the host tier holds: its share of host memory minus one master copy of the weights."""
    host = cluster.host_memory_per_device * cluster.num_devices * options.host_kv_fraction
    return host - cfg.num_params * dtype_bytes(options.dtype)


def evaluate_pair(cfg: ModelConfig, cluster: ClusterSpec, prefill: StageEstimate, decode: StageEstimate,
                  workload: WorkloadSpec, options: PlannerOptions) -> LayoutPlan | None:
    """Seesaw: prefill under one layout, decode under another, KV through the host tier.
    None when the host tier cannot hold even one prompt's KV."""
    capacity = host_kv_capacity(cfg, cluster, options)
    prompt_kv = cfg.kv_bytes_per_token(dtype_bytes(options.dtype)) * workload.mean_prompt_len
    if capacity < prompt_kv:
        return None
    cycles = max(1, math.ceil(workload.num_requests * prompt_kv / capacity))
    link = cluster.host_link_bandwidth
    reload_decode = rl.weight_bytes_per_device(cfg, decode.degrees, options.dtype) / link
    reload_prefill = rl.weight_bytes_per_device(cfg, prefill.degrees, options.dtype) / link
    switch_weights = cycles * reload_decode + (cycles - 1) * reload_prefill

    prefill_time, decode_time = stage_totals(prefill, decode, workload)
    # Every device writes (prefill) and later reads (decode) its share of all prompts' KV.
    kv_host_seconds = workload.num_requests * prompt_kv / cluster.num_devices / link
    if options.overlap_host_transfers:
        exposed = (max(0.0, kv_host_seconds - prefill_time.total)
                   + max(0.0, kv_host_seconds - decode_time.total))
    else:
        exposed = 2 * kv_host_seconds
    switching = rl.TimeBreakdown(switch_weights=switch_weights, switch_kv=exposed)
    return LayoutPlan(prefill, decode, workload, prefill_time + decode_time + switching,
                      num_switches=2 * cycles - 1)


def plan_layouts(cfg: ModelConfig, cluster: ClusterSpec, workload: WorkloadSpec,
                 options: PlannerOptions | None = None) -> Plan:
    """Rank every static layout and every re-sharded pair on `cluster.num_devices` devices."""
    options = options or PlannerOptions()
    all_degrees = rl.enumerate_degrees(cfg, cluster.num_devices, options.max_tp)
    stages, in_flight = {}, {}      # in_flight: a static layout's own decode, where it differs from a pair's
    for degrees in all_degrees:
        prefill = estimate_stage(cfg, cluster, degrees, rl.PREFILL, workload, options)
        decode = estimate_stage(cfg, cluster, degrees, rl.DECODE, workload, options)
        if prefill and decode:
            stages[degrees] = (prefill, decode)
            if in_flight_decode(degrees, options):
                in_flight[degrees] = estimate_stage(cfg, cluster, degrees, rl.DECODE, workload, options, True)
    if not stages:
        need = min(rl.weight_bytes_per_device(cfg, d, options.dtype) for d in all_degrees) if all_degrees else 0
        raise ValueError(
            f"no layout of {cluster.num_devices}x{cluster.name} fits the model: the smallest weight "
            f"shard is {need / 2**30:.1f} GiB per device (plus one sequence of KV) against "
            f"{cluster.device.memory_bytes * options.memory_utilization / 2**30:.1f} GiB usable")

    statics = [evaluate_static(p, in_flight.get(k, d), workload) for k, (p, d) in stages.items()]
    pairs = []
    for src, (prefill, _) in stages.items():
        for dst, (_, decode) in stages.items():
            if src == dst or src[2] != dst[2]:
                continue
            if options.decode_pp_at_most_prefill_pp and dst[1] > src[1]:
                continue
            pair = evaluate_pair(cfg, cluster, prefill, decode, workload, options)
            if pair is not None:
                pairs.append(pair)
    ranked = tuple(sorted(statics + pairs, key=_slowest_last))
    return Plan(cfg, cluster, workload, options, ranked, best_static=min(statics, key=_slowest_last),
                best_pair=min(pairs, key=_slowest_last) if pairs else None)


def _slowest_last(candidate: LayoutPlan) -> float:
    return -candidate.tokens_per_s
