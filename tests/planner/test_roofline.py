"""Roofline terms against hand computation from the paper's table, and its monotonic properties."""
import dataclasses
import json
import os

import pytest

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.planner import roofline as rl
from seesaw_ds.planner.bundled import CONFIG_DIR, load_model_config
from seesaw_ds.planner.clusters import GIB, parse_cluster

# Llama-2-70B layer, by hand from its config (hidden 8192, head_dim 128, 64 q / 8 kv heads, MLP 28672):
#   attention 8192*128*(64+2*8) + 64*128*8192 = 150,994,944; MLP 3*8192*28672 = 704,643,072; norms 2*8192.
W_70B = 855_654_400
L_70B = 80


@pytest.fixture(scope="module")
def llama70b():
    return load_model_config("llama-2-70b")


@pytest.fixture(scope="module")
def a10():
    return parse_cluster("8xA10")


def test_bundled_configs_match_published_sizes():
    published = {"llama-2-70b": 68.98e9, "codellama-34b": 33.74e9, "llama-3-15b": 15.0e9}
    for name, params in published.items():
        with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
            cfg = ModelConfig.from_hf(json.load(f))
        assert abs(cfg.num_params - params) / params < 0.005, name
    assert load_model_config("llama-2-70b").params_per_layer == W_70B


def test_decode_terms_by_hand(llama70b, a10):
    # Decode, TP8, 32 sequences of 1000 tokens, 2-byte elements, A10: 600 GB/s, 125 TFLOP/s.
    step = rl.stage_step_time(llama70b, a10, (8, 1, 1), "decode", batch=32, seq_len=1000, dtype="float16")
    # move weights: L * 2W / (TP * B_mem) = 80 * 2 * 855,654,400 / (8 * 600e9)
    assert step.weights == pytest.approx(0.028521813, rel=1e-6)
    # KV cache: L * 4 b s h_kv d / (DP*TP*PP * B_mem) = 80 * 4*32*1000*8*128 / (8 * 600e9)
    assert step.kv == pytest.approx(0.0021845333, rel=1e-6)
    # linear: L * 2 b W / (N * FLOPS) = 80 * 2*32*855,654,400 / (8 * 125e12)
    assert step.linear == pytest.approx(0.0043809505, rel=1e-6)
    # attention: L * 2 b h_q s d / (N * FLOPS) = 80 * 2*32*64*1000*128 / (8 * 125e12)
    assert step.attention == pytest.approx(0.00004194304, rel=1e-6)
    assert step.p2p == 0


def test_prefill_linear_and_allreduce_by_hand(llama70b, a10):
    # prefill linear under PP8: L * 2 b W s / (N * FLOPS) = 80 * 2*4*2000*855,654,400 / (8 * 125e12)
    step = rl.stage_step_time(llama70b, a10, (1, 8, 1), "prefill", batch=4, seq_len=2000, dtype="float16")
    assert step.linear == pytest.approx(1.09523763, rel=1e-6)
    assert step.allreduce == 0
    # TP8 all-reduce with no latency: L * 4 b s h_q d / B_ar(8), ring B_ar(8) = 16 GiB/s * 8 / 14.
    no_latency = dataclasses.replace(a10, allreduce_latency=(0.0,) * len(a10.allreduce_latency))
    step = rl.stage_step_time(llama70b, no_latency, (8, 1, 1), "prefill", batch=4, seq_len=2000, dtype="float16")
    expected = 80 * 4 * 4 * 2000 * 64 * 128 / (16 * GIB * 8 / 14)
    assert step.allreduce == pytest.approx(expected, rel=1e-9)


def test_allreduce_cost_grows_with_tp(llama70b, a10):
    for stage, seq_len in (("prefill", 2000), ("decode", 2000)):
        costs = [rl.stage_step_time(llama70b, a10, (tp, 8 // tp, 1), stage, 32, seq_len).allreduce
                 for tp in (1, 2, 4, 8)]
        assert costs[0] == 0
        assert all(a < b for a, b in zip(costs, costs[1:])), (stage, costs)
    per_call = [a10.allreduce_seconds(2 ** 24, tp) for tp in (2, 4, 8)]
    assert per_call[0] < per_call[1] < per_call[2]


def test_batch_limit_grows_super_linearly_with_tp_times_pp():
    cfg = load_model_config("codellama-34b")
    h100 = parse_cluster("8xH100")
    for shape in (lambda k: (k, 1, 1), lambda k: (1, k, 1), lambda k: (max(1, k // 2), min(k, 2), 1)):
        limits = {k: rl.batch_limit(cfg, h100, shape(k), seq_len=2048) for k in (1, 2, 4, 8)}
        assert limits[1] >= 1
        per_device = [limits[k] / k for k in (1, 2, 4, 8)]
        assert all(a < b for a, b in zip(per_device, per_device[1:])), limits
    # and DP multiplies the replica's limit
    assert rl.batch_limit(cfg, h100, (2, 1, 4), 2048) == 4 * rl.batch_limit(cfg, h100, (2, 1, 1), 2048)


def test_batch_limit_matches_paper_formula(llama70b, a10):
    # b_max = DP * M_kv * TP * PP / (4 L h_kv d s), M_kv = 0.9 M - weights per device.
    weights = rl.weight_bytes_per_device(llama70b, (8, 1, 1), "float16")
    m_kv = 0.9 * 24 * GIB - weights
    expected = int(m_kv * 8 / (4 * L_70B * 8 * 128 * 3000))
    assert rl.batch_limit(llama70b, a10, (8, 1, 1), 3000, "float16") == expected
    # weights per device: (L*W + vocab-parallel embedding and head) / TP, in 2-byte elements
    assert weights == pytest.approx(2 * (L_70B * W_70B + 2 * 32000 * 8192) / 8)


def test_layout_whose_weights_do_not_fit_has_no_batch(llama70b, a10):
    # 70B in 2 bytes is ~138 GB: four A10s (4 x 21.6 GiB usable) cannot hold one replica.
    assert rl.batch_limit(llama70b, a10, (4, 1, 2), 1000) == 0
    assert rl.batch_limit(llama70b, a10, (2, 2, 2), 1000) == 0
    assert rl.batch_limit(llama70b, a10, (4, 2, 1), 1000) > 0


def test_enumerate_degrees_respects_heads_and_layers():
    cfg = load_model_config("llama-3-15b")           # 8 KV heads
    degrees = rl.enumerate_degrees(cfg, 16)
    assert all(tp * pp * dp == 16 for tp, pp, dp in degrees)
    assert max(tp for tp, _, _ in degrees) == 8
    assert (16, 1, 1) not in degrees and (1, 16, 1) in degrees and (8, 2, 1) in degrees
    with pytest.raises(ValueError, match="num_kv_heads"):
        rl.check_degrees(cfg, (16, 1, 1))


def test_layer_overhead_lm_head_and_pipeline_sends_by_hand(llama70b, a10):
    # Decode, PP8 with 2 micro-batches of 16 sequences: A10 (600 GB/s, 125 TFLOP/s), 2-byte elements.
    step = rl.stage_step_time(llama70b, a10, (1, 8, 1), "decode", batch=32, seq_len=1000, dtype="float16",
                              micro_batches=2)
    # every layer call pays the device's fixed cost: 10 layers per stage x 2 micro-batches x 60 us
    assert step.overhead == pytest.approx(10 * 2 * 60e-6)
    # LM head of the last stage: 2 b V H / FLOPS + m * 2 V H / B_mem (vocab 32000, hidden 8192)
    assert step.lm_head == pytest.approx(2 * 32 * 32000 * 8192 / 125e12 + 2 * 2 * 32000 * 8192 / 600e9)
    # sends: 8 messages per micro-batch at the hop latency, plus b x H activations at the link bandwidth
    assert step.p2p == pytest.approx(2 * rl.PIPE_MESSAGES * 5e-6 + 2 * 32 * 8192 / (16 * GIB))
    # the pass drains: (pp - 1) micro-batch times of the stages without the head on top of the m of work
    work = step.total - step.bubble
    assert step.bubble == pytest.approx(7 * (work - step.lm_head) / 2)
    # under TP the head splits by vocabulary rows and all-reduces each row's (max, id) per rank in fp32;
    # the per-layer cost is not divided
    tp8 = rl.stage_step_time(llama70b, a10, (8, 1, 1), "decode", batch=32, seq_len=1000, dtype="float16")
    assert tp8.overhead == pytest.approx(80 * 60e-6) and tp8.bubble == 0
    assert tp8.lm_head == pytest.approx(2 * 32 * 32000 * 8192 / (8 * 125e12) + 2 * 32000 * 8192 / (8 * 600e9)
                                        + a10.allreduce_seconds(4 * 2 * 8 * 32, 8))


def test_measured_few_row_linear_rate_sets_decode_linears(llama70b, a10):
    # A device that lists its few-row linear rates (as `local` is calibrated): decode's linears take their
    # FLOPs at the rate for the micro-batch's rows (interpolated in log rows), the weight read included.
    rates = (("float16", 1, 0.2e12), ("float16", 16, 3.2e12), ("float16", 64, 10e12))    # below the copy rate
    device = dataclasses.replace(a10.device, decode_flops=rates)
    assert device.decode_flops_for("fp16", 1) == 0.2e12 and device.decode_flops_for("fp16", 0.5) == 0.2e12
    assert device.decode_flops_for("fp16", 4) == pytest.approx(0.2e12 + 0.5 * 3e12)     # halfway in log(rows)
    assert device.decode_flops_for("fp16", 256) == 10e12 and device.decode_flops_for("bf16", 4) is None
    cluster = dataclasses.replace(a10, device=device)
    plain = rl.stage_step_time(llama70b, a10, (8, 1, 1), "decode", batch=4, seq_len=1000, dtype="float16")
    step = rl.stage_step_time(llama70b, cluster, (8, 1, 1), "decode", batch=4, seq_len=1000, dtype="float16")
    w_rank = rl.layer_params_per_rank(llama70b, 8)
    measured = 80 * 2 * 4 * w_rank / device.decode_flops_for("fp16", 4)
    assert step.weights == plain.weights and step.weights + step.linear == pytest.approx(measured)
    assert step.linear > plain.linear
    # prefill keeps the large-matmul rate; a rate faster than the roofline never lowers the linear term
    assert rl.stage_step_time(llama70b, cluster, (8, 1, 1), "prefill", 4, 1000, "float16").linear == \
        rl.stage_step_time(llama70b, a10, (8, 1, 1), "prefill", 4, 1000, "float16").linear
    fast = dataclasses.replace(a10, device=dataclasses.replace(a10.device, decode_flops=(("float16", 1, 1e18),)))
    assert rl.stage_step_time(llama70b, fast, (8, 1, 1), "decode", 4, 1000, "float16").linear == plain.linear
    with pytest.raises(ValueError, match="decode_flops"):
        dataclasses.replace(a10.device, decode_flops=(("float16", 0, 1e12),))


def test_pipeline_head_runs_at_the_solo_rate_while_the_other_stages_wait(llama70b, a10):
    # Devices that share a memory bus run faster alone: without bubbles every stage runs its layers at once,
    # and the last stage's LM head (the others have no such work, they wait for it) runs at the solo rate.
    shared = dataclasses.replace(a10, device=dataclasses.replace(a10.device, solo_speedup=1.5))
    args = dict(batch=32, seq_len=1000, dtype="float16", micro_batches=8)
    busy = rl.stage_step_time(llama70b, a10, (1, 8, 1), "decode", drains=False, **args)
    solo = rl.stage_step_time(llama70b, shared, (1, 8, 1), "decode", drains=False, **args)
    head = 2 * 32 * 32000 * 8192 / 125e12 + 8 * 2 * 32000 * 8192 / 600e9
    assert busy.bubble == solo.bubble == 0 and busy.lm_head == pytest.approx(head) and solo.lm_head == pytest.approx(head / 1.5)
    assert dataclasses.replace(solo, lm_head=busy.lm_head) == busy          # the layers' terms run together
    # a pass that fills and drains, and TP (every rank holds a share of the head), keep the rates of all
    for degrees, drains in (((1, 8, 1), True), ((8, 1, 1), False)):
        assert rl.stage_step_time(llama70b, shared, degrees, "decode", drains=drains, **args) == \
            rl.stage_step_time(llama70b, a10, degrees, "decode", drains=drains, **args)
    with pytest.raises(ValueError, match="solo_speedup"):
        dataclasses.replace(a10.device, solo_speedup=0.9)


def test_decode_in_flight_waits_for_each_trip_through_the_stages(llama70b, a10):
    # Without per-step drains a micro-batch's next token still needs its trip through all pp stages: a step
    # lasts at least (pp - 1) (u - u_head) + u, so fewer micro-batches than stages leave a bubble.
    def step(m, stage="decode"):
        return rl.stage_step_time(llama70b, a10, (1, 4, 1), stage, batch=m, seq_len=1000, dtype="float16",
                                  micro_batches=m, drains=False)
    for m in (1, 2, 3):
        s = step(m)
        work, head = s.total - s.bubble, s.lm_head
        assert s.bubble == pytest.approx(3 * (work - head) / m - (m - 1) * work / m)
        assert s.total == pytest.approx(max(work, 3 * (work - head) / m + work / m))
    assert step(4).bubble == 0 and step(1, "prefill").bubble == 0     # full pipeline; prefill has no tokens to wait for
    drained = rl.stage_step_time(llama70b, a10, (1, 4, 1), "decode", batch=1, seq_len=1000, dtype="float16",
                                 micro_batches=1)
    assert step(1).total == pytest.approx(drained.total)        # one micro-batch: the same as a pass that drains
