"""Link fits recover known latency/bandwidth/bucket figures; a shaped link's cost in the cluster and roofline."""
import dataclasses

import pytest

from seesaw_ds.models.config import ModelConfig
from seesaw_ds.planner import roofline as rl
from seesaw_ds.planner.clusters import ClusterSpec, DeviceSpec
from seesaw_ds.planner.link_fit import (TransferFit, bytes_per_direction, cluster_on_link, fit_line, fit_probe,
                                        fit_link, fit_transfer, nodes_on_link)
from seesaw_ds.planner.link_search import Shape, evaluate, find_best, format_cases, scaled_link, shape_grid
from seesaw_ds.planner.search import PlannerOptions
from seesaw_ds.planner.workload import WorkloadSpec

SIZES = [256 * 4 ** i for i in range(9)]          # 256 B .. 16 MiB, as link_probe's defaults
TINY = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000}


def _base() -> ClusterSpec:
    device = DeviceSpec("cpu", 8 * 2 ** 30, 10e9, (("float32", 80e9), ("bfloat16", 160e9)), 50e-6)
    return ClusterSpec("base", device, 2, allreduce_bandwidth=(5e9,), allreduce_latency=(5e-6,),
                       p2p_bandwidth=5e9, p2p_latency=5e-6, host_link_bandwidth=10e9, host_memory_per_device=8e9)


def test_fit_line_recovers_latency_and_bandwidth():
    times = [80e-6 + n / 1.2e9 for n in SIZES]
    latency, bandwidth = fit_line(SIZES, times)
    assert latency == pytest.approx(80e-6, rel=1e-6) and bandwidth == pytest.approx(1.2e9, rel=1e-6)
    # relative weighting: a 10% error on the largest call moves the latency little, the bandwidth ~10%
    latency, bandwidth = fit_line(SIZES, times[:-1] + [times[-1] * 1.1])
    assert latency == pytest.approx(80e-6, rel=0.1) and bandwidth == pytest.approx(1.2e9, rel=0.1)


def test_fit_line_rejects_bad_input_and_clamps():
    with pytest.raises(ValueError):
        fit_line([1, 2], [1.0])
    with pytest.raises(ValueError):
        fit_line([1, 2], [0.0, 1.0])
    latency, bandwidth = fit_line([1000, 2000], [1e-6, 3e-6])     # negative intercept -> through the origin
    assert latency == 0 and bandwidth > 0


def test_unshaped_fit_is_one_line():
    truth = TransferFit(60e-6, 1.5e9)
    times = [truth.seconds(n) for n in SIZES]
    noisy = [t * (1.3 if i % 2 else 1.0) for i, t in enumerate(times)]      # a busy machine only adds time
    fit = fit_transfer(SIZES, noisy, [t * (1.0 if i % 2 else 1.4) for i, t in enumerate(times)], shaped=False)
    assert fit.sustained_bandwidth is None and fit.bucket_seconds is None
    assert fit.latency == pytest.approx(60e-6, rel=1e-6) and fit.line_bandwidth == pytest.approx(1.5e9, rel=1e-6)


def test_shaped_fit_recovers_rate_line_and_bucket():
    # tc tbf at 25 MB/s with a 10 ms bucket (250 kB) on a 1.5 GB/s line
    truth = TransferFit(100e-6, 1.5e9, 25e6, 0.010)
    sustained = [truth.seconds(n, gap=0.0) for n in SIZES]
    idle = [truth.seconds(n) for n in SIZES]
    fit = fit_transfer(SIZES, sustained, idle, shaped=True)
    assert fit.sustained_bandwidth == pytest.approx(25e6, rel=0.02)
    assert fit.bucket_seconds == pytest.approx(0.010, rel=0.05)
    assert fit.latency == pytest.approx(100e-6, rel=0.02)
    assert fit.line_bandwidth == pytest.approx(1.5e9, rel=0.02)
    for n in SIZES:                                # the fitted model reproduces the probe
        assert fit.seconds(n) == pytest.approx(truth.seconds(n), rel=0.02)
    assert bytes_per_direction(fit, 25e6) == pytest.approx(1.0, rel=0.02)


def test_fit_probe_needs_both_sections():
    part = {"sizes": SIZES, "sustained": [1e-4 + n / 1e9 for n in SIZES], "idle": [1e-4 + n / 1e9 for n in SIZES]}
    allreduce, p2p = fit_probe({"allreduce": part, "p2p": part}, shaped=False)
    assert allreduce == p2p
    with pytest.raises(ValueError, match="p2p"):
        fit_probe({"allreduce": part}, shaped=False)


def test_small_all_reduces_between_compute_set_the_latency_floor():
    # idle and back-to-back calls say 100 us; between compute (as a decode layer's calls come) they took
    # 1.2-1.5 ms: the engine's all-reduces are costed at the fastest of those, the transfer term unchanged
    part = {"sizes": SIZES, "sustained": [1e-4 + n / 1e9 for n in SIZES], "idle": [1e-4 + n / 1e9 for n in SIZES]}
    busy = dict(part, between_compute={"sizes": [256, 1024, 4096], "seconds": [1.2e-3, 1.3e-3, 1.5e-3]})
    plain, _ = fit_probe({"allreduce": part, "p2p": part}, shaped=False)
    allreduce, p2p = fit_probe({"allreduce": busy, "p2p": part}, shaped=False)
    assert allreduce.latency == pytest.approx(1.2e-3 - 256 / 1e9, rel=1e-6)
    assert allreduce.line_bandwidth == plain.line_bandwidth and p2p == plain
    quick = dict(part, between_compute={"sizes": [256], "seconds": [5e-5]})      # never below the line's
    assert fit_probe({"allreduce": quick, "p2p": part}, shaped=False)[0] == plain


def test_unshaped_cluster_costs_are_latency_plus_bandwidth():
    spec = cluster_on_link(_base(), TransferFit(1e-4, 1e9), TransferFit(2e-4, 2e9))
    assert not spec.shaped
    assert spec.allreduce_seconds(1e6, 2, calls=4, gap=1.0) == pytest.approx(4e-4 + 1e-3)
    assert spec.p2p_seconds(1e6, messages=8, transfers=2) == pytest.approx(8 * 2e-4 + 5e-4)
    assert spec.allreduce_seconds(1e6, 1) == 0


def test_shaped_cluster_refills_during_compute():
    fit = TransferFit(1e-4, 1e9, 25e6, 0.010)
    spec = cluster_on_link(_base(), fit, fit)
    n = 1e6                                        # 40 ms at the sustained rate
    assert spec.allreduce_seconds(n, 2) == pytest.approx(1e-4 + 0.040)                  # back to back
    assert spec.allreduce_seconds(n, 2, gap=0.004) == pytest.approx(1e-4 + 0.036)       # partial refill
    assert spec.allreduce_seconds(n, 2, gap=1.0) == pytest.approx(1e-4 + 0.030)         # full bucket
    assert spec.allreduce_seconds(1e4, 2, gap=1.0) == pytest.approx(1e-4 + 1e-5)        # under the bucket: line
    assert spec.p2p_seconds(2 * n, messages=8, transfers=2, gap=1.0) == pytest.approx(8e-4 + 2 * 0.030)
    with pytest.raises(ValueError, match="shaped"):
        dataclasses.replace(spec, p2p_sustained_bandwidth=None)


def test_roofline_uses_compute_as_refill_time():
    cfg = ModelConfig.from_hf(TINY)
    fit = TransferFit(1e-4, 1e9, 25e6, 0.010)
    shaped = cluster_on_link(_base(), fit, fit)
    no_refill = dataclasses.replace(shaped, link_bucket_seconds=0.0)
    step = rl.stage_step_time(cfg, shaped, (2, 1, 1), "decode", batch=64, seq_len=512, dtype="float32")
    step0 = rl.stage_step_time(cfg, no_refill, (2, 1, 1), "decode", batch=64, seq_len=512, dtype="float32")
    # by hand: each of 2 all-reduces per layer moves 64 x 256 x 4 bytes after 1/2 of the layer's compute
    gap = (step.weights + step.linear + step.kv + step.attention + step.overhead) / (4 * 2)
    per_call = 1e-4 + max(64 * 256 * 4 / 1e9, 64 * 256 * 4 / 25e6 - min(0.010, gap))
    assert step.allreduce == pytest.approx(4 * 2 * per_call, rel=1e-9)
    assert step0.allreduce == pytest.approx(4 * 2 * (1e-4 + 64 * 256 * 4 / 25e6), rel=1e-9)
    assert step.allreduce < step0.allreduce and step.weights == step0.weights
    pipe = rl.stage_step_time(cfg, shaped, (1, 2, 1), "prefill", batch=4, seq_len=512, dtype="float32",
                              micro_batches=4)
    pipe0 = rl.stage_step_time(cfg, no_refill, (1, 2, 1), "prefill", batch=4, seq_len=512, dtype="float32",
                               micro_batches=4)
    assert pipe0.p2p == pytest.approx(4 * 8 * 1e-4 + 4 * 512 * 256 * 4 / 25e6, rel=1e-9)
    assert pipe.p2p < pipe0.p2p


def _node_of(n: int) -> ClusterSpec:
    """n devices of one node: degree k all-reduces at 1e9 * k bytes/s and k microseconds (told apart below)."""
    return dataclasses.replace(_base(), num_devices=n, allreduce_bandwidth=tuple(1e9 * k for k in range(2, n + 1)),
                               allreduce_latency=tuple(1e-6 * k for k in range(2, n + 1)))


def test_nodes_on_link_keep_the_node_inside_and_the_link_across():
    link = TransferFit(1e-4, 1e9, 25e6, 0.010)
    spec = nodes_on_link(_node_of(4).with_devices(8), link, TransferFit(2e-4, 2e9, 20e6, 0.020), node_size=4)
    assert spec.num_devices == 8 and spec.node_size == 4 and spec.shaped
    n = 1e6
    for degree in (2, 3, 4):                        # inside a node: the node's own figures, never the bucket
        assert spec.allreduce_seconds(n, degree) == pytest.approx(1e-6 * degree + n / (1e9 * degree))
    for degree in (5, 8, 16):                       # across nodes: the link, back to back at its sustained rate
        assert spec.allreduce_seconds(n, degree) == pytest.approx(1e-4 + n / 25e6)
    assert spec.p2p_seconds(n, gap=1.0) == pytest.approx(2e-4 + n / 20e6 - 0.015)      # the mean bucket
    one_per_host = nodes_on_link(_node_of(2), link, link, node_size=1)
    assert one_per_host == cluster_on_link(_node_of(2), link, link) and one_per_host.node_size is None
    assert one_per_host.allreduce_seconds(n, 2) == pytest.approx(1e-4 + n / 25e6)


def test_a_probe_of_an_unknown_link_is_fitted_shaped_only_where_it_finds_a_bucket():
    flat = {"sizes": SIZES, "sustained": [1e-4 + n / 1e9 for n in SIZES],
            "idle": [(1e-4 + n / 1e9) * (1.2 if i % 2 else 1.0) for i, n in enumerate(SIZES)]}
    truth = TransferFit(100e-6, 1.5e9, 25e6, 0.010)
    bucket = {"sizes": SIZES, "sustained": [truth.seconds(n, gap=0.0) for n in SIZES],
              "idle": [truth.seconds(n) for n in SIZES]}
    allreduce, p2p, shaped = fit_link({"allreduce": flat, "p2p": flat})
    assert not shaped and (allreduce, p2p) == fit_probe({"allreduce": flat, "p2p": flat}, shaped=False)
    allreduce, p2p, shaped = fit_link({"allreduce": bucket, "p2p": bucket})
    assert shaped and p2p.sustained_bandwidth == pytest.approx(25e6, rel=0.02)
    assert p2p.bucket_seconds == pytest.approx(0.010, rel=0.05)
    # idle calls faster than back-to-back ones on one operation only, at rates far apart: machine noise on an
    # unshaped link (seen on a veth pair: all-reduce ~0.8 GB/s "sustained", sends ~7 GB/s), not a rate limit
    fast = TransferFit(100e-6, 50e9, 7e9, 0.006)
    noisy = {"sizes": SIZES, "sustained": [fast.seconds(n, gap=0.0) * 9 for n in SIZES],
             "idle": [fast.seconds(n) for n in SIZES]}
    sends = {"sizes": SIZES, "sustained": [1e-4 + n / 7e9 for n in SIZES], "idle": [1e-4 + n / 7e9 for n in SIZES]}
    assert fit_probe({"allreduce": noisy, "p2p": sends}, shaped=True)[0].bucket_seconds > 0
    assert not fit_link({"allreduce": noisy, "p2p": sends})[2]


def test_a_slow_link_between_hosts_ranks_tp_across_them_below_replicas():
    """Two hosts of one rank: on a fast link the planner may take TP2 (its all-reduces are cheap); at 25 MB/s
    TP2's per-layer all-reduces cost more than replicas' nothing, and the ranking follows."""
    from seesaw_ds.planner.search import plan_layouts
    from seesaw_ds.planner.workload import parse_workload
    cfg = ModelConfig.from_hf(TINY)
    slow = nodes_on_link(_node_of(2), TransferFit(1e-4, 1e9, 25e6, 0.010), TransferFit(1e-4, 1e9, 25e6, 0.010), 1)
    fast = nodes_on_link(_node_of(2), TransferFit(5e-6, 5e9), TransferFit(5e-6, 5e9), 1)
    tps = {}
    for name, spec in (("slow", slow), ("fast", fast)):
        ranked = plan_layouts(cfg, spec, parse_workload("512/256/64"), PlannerOptions(dtype="float32")).ranked
        static = {c.prefill.degrees: c.tokens_per_s for c in ranked if c.is_static}
        tps[name] = static[(2, 1, 1)] / static[(1, 1, 2)]
    assert tps["slow"] < 0.5 * tps["fast"] and tps["slow"] < 1


def test_scaled_link_keeps_line_and_bucket():
    fit = TransferFit(1e-4, 1e9, 25e6, 0.010)
    half = scaled_link(fit, 0.5)
    assert half.sustained_bandwidth == pytest.approx(12.5e6) and half.bucket_seconds == 0.010
    assert half.latency == fit.latency and half.line_bandwidth == fit.line_bandwidth
    assert scaled_link(fit, 100).line_bandwidth == pytest.approx(2.5e9)      # the line is never below the rate
    with pytest.raises(ValueError):
        scaled_link(TransferFit(1e-4, 1e9), 2.0)


def test_find_best_ranks_measurable_cases_by_gain():
    with pytest.raises(ValueError):
        Shape(500, 4, 2)                                  # not a multiple of the head dim
    shapes = shape_grid(hiddens=(256, 512), layers=(4, 8), kv_options=(2, "all"))
    assert Shape(256, 4, 4) in shapes and all(s.kv_heads >= 2 for s in shapes)
    fit = TransferFit(1e-4, 1e9, 25e6, 0.010)
    links = {"unlimited": cluster_on_link(_base(), TransferFit(1e-4, 1e9), TransferFit(1e-4, 1e9)),
             "200mbit": cluster_on_link(_base(), fit, fit),
             "50mbit": cluster_on_link(_base(), scaled_link(fit, 0.25), scaled_link(fit, 0.25))}
    loads = [WorkloadSpec("arxiv", 1536, 64, 4), WorkloadSpec("sharegpt", 300, 250, 16)]
    options = PlannerOptions(dtype="float32")
    cases = find_best(shapes, loads, links, options, max_seconds=1e9, max_params=1e12)
    assert len(cases) == len(shapes) * len(loads) * len(links)
    assert [c.gain for c in cases] == sorted((c.gain for c in cases), reverse=True)
    top = cases[0]
    again = evaluate(top.shape, top.workload, top.link, links[top.link], options)
    assert again.gain == pytest.approx(top.gain) and top.rates["PP2->TP2"] > 0
    assert f"random:{top.shape.label}" in format_cases(cases[:1]).splitlines()[1]
    # the filters: a run-time cap and a parameter cap drop cases, never reorder the rest
    capped = find_best(shapes, loads, links, options, max_seconds=top.seconds * 0.999, max_params=1e12)
    assert top not in capped and all(c.seconds < top.seconds for c in capped)
    small = find_best(shapes, loads, links, options, max_seconds=1e9, max_params=shapes[0].model_config().num_params)
    assert {c.shape for c in small} == {s for s in shapes
                                        if s.model_config().num_params <= shapes[0].model_config().num_params}


def test_a_noisy_small_call_does_not_hide_the_bucket():
    """A probe of a 200 Mbit/s tbf link (25 MB/s, 10 ms bucket) between two namespaced hosts, as measured: the
    16 KiB idle send took 1.7 ms (the machine, not the bucket) and the 64 KiB one measured ~0. The bucket
    throttles only the largest calls, so the fit still finds it and the link is kept shaped."""
    sizes = [256 * 4 ** i for i in range(8)]
    probe = {"allreduce": {"sizes": sizes,
                           "sustained": [0.00115, 0.00269, 0.00256, 0.00278, 0.00272, 0.0109, 0.0438, 0.188],
                           "idle": [0.00124, 0.000668, 0.000884, 0.00158, 0.000778, 0.00157, 0.0343, 0.166]},
             "p2p": {"sizes": sizes,
                     "sustained": [0.000143, 0.000197, 0.000201, 0.000693, 0.00267, 0.011, 0.0437, 0.175],
                     "idle": [0.000252, 0.00011, 0.000316, 0.00168, 1e-07, 0.000918, 0.034, 0.166]}}
    allreduce, p2p, shaped = fit_link(probe)
    assert shaped
    for fit in (allreduce, p2p):
        assert fit.sustained_bandwidth == pytest.approx(24e6, rel=0.05)
        assert fit.bucket_seconds == pytest.approx(0.010, rel=0.15)
        assert fit.line_bandwidth >= 4 * fit.sustained_bandwidth
