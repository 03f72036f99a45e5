"""Layout search: the preferences the paper states, memory limits, and whole-workload bookkeeping."""
import dataclasses
import math

import pytest

from seesaw_ds.parallel.layout import Layout, StageLayouts
from seesaw_ds.planner import (CLUSTERS, PlannerOptions, WorkloadSpec, load_model_config, parse_cluster,
                               parse_workload, plan, plan_for, plan_layouts)
from seesaw_ds.planner import roofline as rl
from seesaw_ds.planner.clusters import GB, GIB
from seesaw_ds.planner.search import estimate_stage

OPTIONS = PlannerOptions()
# The paper's model: pp micro-batches in flight across steps (no bubble), no token budget per prefill step.
PAPER = PlannerOptions(decode_micro_batches=None, prefill_micro_batches=None, pipeline_drains=False,
                       max_batched_tokens=None)


@pytest.fixture(scope="module")
def llama70b():
    return load_model_config("llama-2-70b")


def _stage_speeds(cfg, cluster, stage, workload, options=OPTIONS):
    out = {}
    for degrees in rl.enumerate_degrees(cfg, cluster.num_devices):
        est = estimate_stage(cfg, cluster, degrees, stage, workload, options)
        if est is not None:
            out[degrees] = est.tokens_per_s
    return out


def test_decode_prefers_tp_as_memory_bandwidth_drops(llama70b):
    a10 = parse_cluster("8xA10")
    workload = parse_workload("sharegpt")
    chosen_tp, tp_over_pp = [], []
    for bandwidth in (20000, 4000, 1000, 600, 150, 40):  # GB/s per device, falling
        cluster = dataclasses.replace(a10, device=dataclasses.replace(a10.device, memory_bandwidth=bandwidth * GB))
        speeds = _stage_speeds(llama70b, cluster, "decode", workload, PAPER)
        chosen_tp.append(max(speeds, key=speeds.get)[0])
        tp_over_pp.append(speeds[(8, 1, 1)] / speeds[(1, 8, 1)])
    assert chosen_tp == sorted(chosen_tp) and chosen_tp[0] < chosen_tp[-1] == 8, chosen_tp
    assert all(a < b for a, b in zip(tp_over_pp, tp_over_pp[1:])), tp_over_pp


@pytest.mark.parametrize("model,spec", [("llama-2-70b", "8xA10"), ("codellama-34b", "8xL4"),
                                        ("llama-3-15b", "4xA10"), ("llama-2-70b", "8xA100-PCIE")])
def test_prefill_prefers_pp_over_tp_on_pcie(model, spec):
    cfg, cluster = load_model_config(model), parse_cluster(spec)
    speeds = _stage_speeds(cfg, cluster, "prefill", parse_workload("arxiv"), PAPER)
    n = cluster.num_devices
    assert speeds[(1, n, 1)] > speeds[(n, 1, 1)]
    best = max(speeds, key=speeds.get)
    assert best[1] >= best[0], best
    result = plan(cfg, cluster, "arxiv", PAPER)
    assert result.best_pair.prefill.degrees[1] > result.best_pair.decode.degrees[1]


def test_layouts_whose_weights_do_not_fit_are_excluded(llama70b):
    result = plan(llama70b, "8xA10", "arxiv")
    usable = 0.9 * 24 * GIB
    for cand in result.ranked:
        for est in (cand.prefill, cand.decode):
            tp, pp, dp = est.degrees
            assert dp == 1, est.degrees                       # a replica needs all 8 A10s
            assert 2 * llama70b.num_params / (tp * pp) < usable
    with pytest.raises(ValueError, match="no layout"):
        plan(llama70b, "4xA10", "arxiv")


@pytest.mark.parametrize("kind", sorted(CLUSTERS))
@pytest.mark.parametrize("model,count", [("llama-2-70b", 8), ("codellama-34b", 8), ("llama-3-15b", 4)])
def test_every_cluster_and_model_gets_a_plan(kind, model, count):
    for workload in ("arxiv", "sharegpt"):
        result = plan(model, f"{count}x{kind}", workload)
        speeds = [c.tokens_per_s for c in result.ranked]
        assert speeds == sorted(speeds, reverse=True) and speeds[-1] > 0
        assert result.best_static.is_static and result.best.tokens_per_s >= result.best_static.tokens_per_s
        pair = result.best_pair
        assert pair is not None and not pair.is_static
        assert pair.prefill.degrees[2] == pair.decode.degrees[2]
        assert pair.decode.degrees[1] <= pair.prefill.degrees[1]
        assert math.isclose(sum(pair.time.as_dict().values()), pair.time.total)


def test_static_workload_time_adds_the_two_stages(llama70b):
    workload = WorkloadSpec("w", mean_prompt_len=1000, mean_output_len=100, num_requests=500)
    result = plan(llama70b, "8xA10", workload)
    static = result.best_static
    prefill_s = 500 * 1000 / static.prefill.tokens_per_s
    decode_s = 500 * 100 / static.decode.tokens_per_s
    assert static.time.total == pytest.approx(prefill_s + decode_s, rel=1e-9)
    assert static.tokens_per_s == pytest.approx(500 * 1100 / (prefill_s + decode_s), rel=1e-9)
    assert static.num_switches == 0 and static.time.switch_weights == 0


def test_switch_cost_counts_host_tier_cycles(llama70b):
    # Host tier of 8 x 40 GiB * 0.9 minus the 138 GB weight copy; each prompt's KV is 1000 * 327,680 B.
    cluster = dataclasses.replace(parse_cluster("8xA10"), host_memory_per_device=40 * GIB)
    workload = WorkloadSpec("w", mean_prompt_len=1000, mean_output_len=100, num_requests=2000)
    result = plan_layouts(llama70b, cluster, workload, PlannerOptions(dtype="float16"))
    pair = next(c for c in result.ranked if c.prefill.degrees == (1, 8, 1) and c.decode.degrees == (8, 1, 1))
    capacity = 8 * 40 * GIB * 0.9 - 2 * llama70b.num_params
    cycles = math.ceil(2000 * 1000 * 2 * 80 * 8 * 128 * 2 / capacity)
    assert cycles > 1 and pair.num_switches == 2 * cycles - 1
    reload_decode = rl.weight_bytes_per_device(llama70b, (8, 1, 1), "float16") / (16 * GIB)
    reload_prefill = rl.weight_bytes_per_device(llama70b, (1, 8, 1), "float16") / (16 * GIB)
    assert pair.time.switch_weights == pytest.approx(cycles * reload_decode + (cycles - 1) * reload_prefill)


def test_plan_for_returns_stage_layouts(llama70b):
    layouts = plan_for(llama70b, 8, "8xA10", "arxiv", PAPER)
    assert isinstance(layouts, StageLayouts)
    assert layouts.prefill == Layout(tp=1, pp=8, dp=1) and layouts.decode == Layout(tp=8, pp=1, dp=1)
    layouts.validate(8, llama70b)


def test_parsing():
    assert parse_cluster("8xA10").num_devices == 8 and parse_cluster("4 x h100").device.name == "H100"
    with pytest.raises(ValueError, match="unknown device kind"):
        parse_cluster("8xB200")
    with pytest.raises(ValueError, match="device count"):
        parse_cluster("A10")
    custom = parse_workload("1536/64/32")
    assert (custom.mean_prompt_len, custom.mean_output_len, custom.num_requests) == (1536, 64, 32)
    assert parse_workload("arxiv", num_requests=7).num_requests == 7
    with pytest.raises(ValueError, match="num_requests"):
        WorkloadSpec("bad", 10, 10, 0)


def test_draining_pipeline_pays_a_bubble_per_step(llama70b):
    # The engine's pipeline pass fills and drains every step: m micro-batches over pp stages take
    # (m + pp - 1) micro-batch times, so one decode micro-batch under PP8 costs 8 stage times.
    a10 = parse_cluster("8xA10")
    drained = rl.stage_step_time(llama70b, a10, (1, 8, 1), "decode", 64, 1000, micro_batches=1)
    work = drained.total - drained.bubble
    # (the last stage's LM head runs once per micro-batch: it is not part of the fill and drain)
    assert drained.bubble == pytest.approx(7 * (work - drained.lm_head))
    assert drained.total == pytest.approx(8 * work - 7 * drained.lm_head)
    # more micro-batches shrink the bubble's share, at the price of re-reading the weights per micro-batch
    shares = [rl.stage_step_time(llama70b, a10, (1, 8, 1), "prefill", 64, 1000, micro_batches=m)
              for m in (1, 8, 64)]
    fractions = [s.bubble / s.total for s in shares]
    assert fractions[0] > fractions[1] > fractions[2]
    assert shares[0].weights < shares[1].weights < shares[2].weights
    # with the engine's defaults, static PP decode is predicted slower than TP decode
    speeds = _stage_speeds(llama70b, a10, "decode", parse_workload("sharegpt"))
    assert speeds[(8, 1, 1)] > speeds[(1, 8, 1)]


def test_planner_defaults_follow_the_engine():
    from seesaw_ds.distributed.pipe_executor import PipelineExecutor
    from seesaw_ds.engine.config import EngineConfig
    from seesaw_ds.parallel import micro_batches
    assert OPTIONS.prefill_micro_batches == micro_batches.PREFILL_WINDOW
    assert OPTIONS.decode_micro_batches == micro_batches.DECODE_MICRO_BATCHES
    assert OPTIONS.max_batched_tokens == EngineConfig().max_num_batched_tokens
    assert OPTIONS.prefill_window_tokens == micro_batches.prefill_window_tokens(2)
    assert micro_batches.prefill_window_tokens(1) == 0          # no pipeline: the step budget rules
    defaults = PipelineExecutor.__init__.__defaults__           # the executor's own counts are these
    assert defaults[-2:] == (micro_batches.PREFILL_WINDOW, micro_batches.DECODE_MICRO_BATCHES)


def test_the_planner_cuts_a_prefill_step_as_the_engine_does():
    # a pipelined step into about one micro-batch per 1024 tokens (32 prompts of 128: 4); no pipeline: one
    from seesaw_ds.parallel.micro_batches import prefill_micro_batch_count
    cfg, a10 = load_model_config("llama-3-15b"), parse_cluster("2xA10")
    fixed = WorkloadSpec("fixed", 128, 256, 32)
    assert prefill_micro_batch_count(32 * 128) == 4
    for degrees, m in (((1, 2, 1), 4), ((2, 1, 1), 1)):
        est = estimate_stage(cfg, a10, degrees, "prefill", fixed, OPTIONS)
        assert est.batch == 32
        assert est.step == rl.stage_step_time(cfg, a10, degrees, "prefill", 32, 128, OPTIONS.dtype, m,
                                              drains=OPTIONS.pipeline_drains)
        assert est.step != rl.stage_step_time(cfg, a10, degrees, "prefill", 32, 128, OPTIONS.dtype, 16,
                                              drains=OPTIONS.pipeline_drains)


def test_pipelined_prefill_streams_close_to_the_steady_pipeline():
    # A pipelined prefill stage admits a window of many micro-batches per pass, so its bubble is paid once
    # per window: the prediction sits within the window's (pp - 1) / m share of the steady-state pipeline,
    # where a step capped by the decode-era budget (2 prompts of 1536 in 4096 tokens) paid (pp - 1) / 2.
    cfg, a10 = load_model_config("llama-3-15b"), parse_cluster("2xA10")
    arxiv = WorkloadSpec("arxiv-like", 1536, 64, 16)
    stream = estimate_stage(cfg, a10, (1, 2, 1), "prefill", arxiv, OPTIONS)
    steady = estimate_stage(cfg, a10, (1, 2, 1), "prefill", arxiv,
                            dataclasses.replace(OPTIONS, pipeline_drains=False))
    stepped = estimate_stage(cfg, a10, (1, 2, 1), "prefill", arxiv,
                             dataclasses.replace(OPTIONS, max_batched_tokens=4096, prefill_window_tokens=None,
                                                 prefill_micro_batches=8))
    assert stream.batch == 16                      # every prompt in one window: one pass
    head = stream.step.lm_head                                             # (pp - 1) / m of the head-less work
    assert stream.step.bubble == pytest.approx((stream.step.total - stream.step.bubble - head) / 16)
    work = steady.step.total                                               # the same m = 16 micro-batches
    assert stream.tokens_per_s == pytest.approx(steady.tokens_per_s * work / (work + (work - head) / 16))
    assert stream.tokens_per_s > steady.tokens_per_s * 16 / 17                # above the head-in-bubble bound
    step = stepped.step
    assert stepped.batch == 2 and step.bubble == pytest.approx((step.total - step.bubble - step.lm_head) / 2)
    assert stream.tokens_per_s > 1.2 * stepped.tokens_per_s
    # without a pipeline the window does not apply: the step budget caps the batch
    flat = estimate_stage(cfg, a10, (2, 1, 1), "prefill", arxiv,
                          dataclasses.replace(OPTIONS, max_batched_tokens=4096))
    assert flat.batch == 2



def test_static_pipeline_decode_keeps_micro_batches_in_flight():
    # The engine's static PP decode (single-rank stages) runs pp micro-batches per step with no bubble
    # (engine/in_flight.py); a pair whose decode is a pipeline still passes once per step, filling and draining.
    cfg, a10 = load_model_config("llama-3-15b"), parse_cluster("2xA10")
    sharegpt = WorkloadSpec("sharegpt", 300, 300, 64)
    pp2, tp_pp = (1, 2, 1), (2, 2, 1)
    flight = estimate_stage(cfg, a10, pp2, "decode", sharegpt, OPTIONS, in_flight=True)
    steady = estimate_stage(cfg, a10, pp2, "decode", sharegpt,
                            dataclasses.replace(OPTIONS, decode_micro_batches=2, pipeline_drains=False))
    passed = estimate_stage(cfg, a10, pp2, "decode", sharegpt, OPTIONS)
    assert flight.step.bubble == 0 and flight.step.p2p < steady.step.p2p   # 2 messages a micro-batch, not 8
    assert dataclasses.replace(flight.step, p2p=0) == dataclasses.replace(steady.step, p2p=0)
    # memory-bound decode reads each stage's weights once per micro-batch: a gain, though not 2x
    assert passed.step.bubble > 0 and 1.1 * passed.tokens_per_s < flight.tokens_per_s < 2 * passed.tokens_per_s
    off = estimate_stage(cfg, a10, pp2, "decode", sharegpt, dataclasses.replace(OPTIONS, decode_in_flight=False),
                         in_flight=True)
    assert off.step == passed.step
    cluster = parse_cluster("4xA10")               # TP inside a stage: one pass per step, as the engine does
    assert estimate_stage(cfg, cluster, tp_pp, "decode", sharegpt, OPTIONS, in_flight=True).step == \
        estimate_stage(cfg, cluster, tp_pp, "decode", sharegpt, OPTIONS).step
    ranked = plan_layouts(cfg, a10, sharegpt, dataclasses.replace(OPTIONS, decode_pp_at_most_prefill_pp=False)).ranked
    static_pp2 = next(c for c in ranked if c.is_static and c.decode.degrees == pp2)
    assert static_pp2.decode.step == flight.step
    pair = next(c for c in ranked if c.prefill.degrees == (2, 1, 1) and c.decode.degrees == pp2)
    assert pair.decode.step == passed.step
